"""ZDS, Istio's node agent <-> tunnel workload protocol, shared by both sides.

Why this package exists: the agent (ZDS server, nodeagent.agent.zds_server) and the tunnel (ZDS client,
nodeagent.ztunnel.zds_client) are independent layers that may not import each other, yet must agree
byte for byte on the wire. So the message types, their protobuf encoding (codec.py, pure) and the
SEQPACKET + SCM_RIGHTS transport (wire.py) live here, below both.

What it deliberately does not do: no connection policy (who sends what when, retries, snapshots): that
belongs to the server and client modules.
"""
