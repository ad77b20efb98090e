"""nodeagent: a sidecar-free service mesh node agent (Istio ambient style), in Python."""

__version__ = "0.1.0"
