"""The node's background work on spooled images: the worker classifies, the delivery
sends SRs, the catch-up fetches what the route missed, the watchdog ends a hung batch.
"""
