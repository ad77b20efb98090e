"""`sudo make demo` is the project's main job: it must run to the end on a fresh machine and leave nothing.

The demo's own checks (tcpdump on the fabric, inspect --verify) are printed by it; this test adds the
independent ones that matter to a user: exit status, the host afterwards (`ip netns`, processes), and
that the printed proof lines are there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_the_demo_runs_end_to_end_and_leaves_the_host_clean() -> None:
    before = _netns()
    proc = subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "verified: no problems found" in out
    assert "=> only mTLS to port 15008 between enrolled pods" in out
    assert "payload marker 'NODEAGENT-DEMO-SECRET' readable on the wire: False" in out
    # The non-enrolled pod's bytes are readable: proof that the capture really looks at the wire.
    assert "non-mesh pod's marker 'LEGACY-PLAINTEXT' readable on the wire: True" in out
    assert "'from 10.10.1.10: NODEAGENT-DEMO-SECRET'" in out  # the server saw the client pod's own IP
    assert 'direction="inbound"' in out and 'src.identity="spiffe://cluster.local/ns/shop/sa/frontend"' in out
    assert _netns() == before
    leftover = subprocess.run(
        ["pgrep", "-f", "nodeagent.cli (tunnel|agent|ca serve)"], capture_output=True, check=False
    )
    assert leftover.returncode == 1, f"processes left running: {leftover.stdout!r}"
