"""The tunnel process (`nodeagent tunnel`): pods in over ZDS, listeners and proxies out; see tunnel.py."""
