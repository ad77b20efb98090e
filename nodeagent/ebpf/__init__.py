"""eBPF capture: C programs compiled by bcc (loader.py), pinned state read without bcc (maps.py, pins.py)."""
