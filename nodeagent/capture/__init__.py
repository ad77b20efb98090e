"""Capture: steering an enrolled pod's TCP to the tunnel, inside the pod's own netns (see backend.py)."""
