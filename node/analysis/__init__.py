"""Where an image is analysed: the chest filter (triage), preprocessing, the model and
its class activation maps (cam).
"""
