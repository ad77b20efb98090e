"""`nodeagent ca serve --log-level`: the CA logs at info by default, as the agent and the tunnel do.

Why: without it the CA ran at the CLI's warning level, so the DaemonSet's CA said nothing of the
certificates it issued, and the ConfigMap's LOG_LEVEL (which the agent and the tunnel take) could not reach
it. The oracle is the CA process's own stderr, and daemonset/ca.yaml passing the ConfigMap's level.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAB_INVENTORY = ROOT / "nodeagent" / "lab" / "default.yaml"
NODEAGENT = str(Path(sys.executable).with_name("nodeagent"))


def serve_and_stop(tmp_path: Path, *extra: str) -> str:
    """Start `ca serve`, wait for its 'CA serving on' line, SIGTERM it; its stderr."""
    argv = [NODEAGENT, "ca", "serve", "--state-dir", str(tmp_path / "ca"), "--inventory", str(LAB_INVENTORY)]
    proc = subprocess.Popen(
        [*argv, "--listen", "127.0.0.1:0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]  # a fresh state dir: "created a new root ..." first
        while lines[-1] and "CA serving on" not in lines[-1]:
            lines.append(proc.stdout.readline())
        assert "CA serving on" in lines[-1], lines
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return err


@pytest.mark.parametrize(("extra", "logged"), [((), True), (("--log-level", "warning"), False)])
def test_the_ca_logs_at_info_unless_told_otherwise(tmp_path: Path, extra: tuple[str, ...], logged: bool) -> None:
    err = serve_and_stop(tmp_path, *extra)
    assert ("INFO nodeagent.ca.server: CA serving on 127.0.0.1:0" in err) is logged, err


def test_the_manifest_passes_the_configmaps_level() -> None:
    config = yaml.safe_load((ROOT / "daemonset" / "configmap.yaml").read_text())
    assert config["data"]["LOG_LEVEL"] == "info"
    docs = [d for d in yaml.safe_load_all((ROOT / "daemonset" / "ca.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (ca,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--log-level=$(LOG_LEVEL)" in ca["args"]
    assert {"configMapRef": {"name": "nodeagent-config"}} in ca["envFrom"]
