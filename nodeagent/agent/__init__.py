"""The node agent: enrollment of the node's pods, capture, status, and handing pods to the tunnel (ZDS)."""
