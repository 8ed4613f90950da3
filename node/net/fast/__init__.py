"""pynetdicom 3.0 workarounds that make the network layer fast (``network.fast_paths``):
switchable, and version-guarded by :mod:`node.net.fast.fastpaths`; off, the node runs on
stock pynetdicom with only the socket options of :mod:`node.net.fast.sockopts`.
"""
