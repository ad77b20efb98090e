"""`sudo make demo` is the project's main job: it must run to the end on a fresh machine and leave nothing.

The demo's own checks (tcpdump on the fabric, inspect --verify) are printed by it; this test adds the
independent ones that matter to a user: exit status, the host afterwards (`ip netns`, processes), and
that the printed proof lines are there.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
from oracles import DENY_FRONTEND

REPO = Path(__file__).resolve().parent.parent.parent


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_the_demo_runs_end_to_end_and_leaves_the_host_clean() -> None:
    before = _netns()
    run_before = Path("/run/nodeagent").exists()
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
    assert not Path("/run/nodeagent").exists() or run_before, "an empty /run/nodeagent was left behind"


# --- how the demo ends, and what it leaves alone ------------------------------------------------------------

RUN = Path("/run/nodeagent/demo")
PIN_ROOT = Path("/sys/fs/bpf/nodeagent")
LAB_LOCK_HELD_ENV = "NODEAGENT_LAB_LOCK_HELD"  # set by conftest: the session holds the lab lock for its children


def demo_popen(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "nodeagent.cli", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        **kwargs,
    )


def read_until(stream: IO[str], marker: str, timeout: float = 60) -> str:
    """What `stream` says up to (at least) the first `marker`. Read from its file descriptor: select() on a
    text stream whose readline() has buffered several lines would wait for more that never come."""
    seen, deadline = "", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([stream.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(stream.fileno(), 65536).decode(errors="replace") if ready else ""
        assert chunk, f"{marker!r} never came; output so far:\n{seen[-3000:]}"
        seen += chunk
    return seen


def assert_host_clean(pins_before: list[str]) -> None:
    assert [n for n in _netns() if n.startswith("na-")] == []
    leftover = subprocess.run(
        ["pgrep", "-f", "nodeagent.cli (tunnel|agent|ca serve)|nodeagent.lab exec|tcpdump -i br0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert leftover.returncode == 1, f"processes left running: {leftover.stdout!r}"
    assert not Path("/run/nodeagent/lab").exists()
    assert _pins() == pins_before
    assert not RUN.exists(), f"the demo left its files: {sorted(str(p) for p in RUN.rglob('*'))[:10]}"


def _pins() -> list[str]:
    return sorted(str(p) for p in PIN_ROOT.rglob("*")) if PIN_ROOT.is_dir() else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(sig: signal.Signals) -> None:
    """`timeout`/`kill` signal the demo's pid only, an SSH drop sends SIGHUP: the lab must go all the same."""
    pins = _pins()
    proc = demo_popen(start_new_session=True)  # nothing else in its group gets the signal
    try:
        read_until(proc.stdout, "=== 4.")  # type: ignore[arg-type]
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, out[-2000:] + err[-2000:]
    assert f"demo stopped by {sig.name}; the lab was removed" in out
    assert "host clean: no lab namespace left" in out
    assert "Traceback" not in err
    assert_host_clean(pins)


def test_a_closed_output_pipe_stops_the_demo_quietly() -> None:
    """`nodeagent demo | head -2`: no BrokenPipeError traceback, and the lab is removed."""
    pins = _pins()
    proc = demo_popen()
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.readline()
        proc.stdout.close()  # what head does after its lines
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert_host_clean(pins)


def run_hint(hint: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """One of the commands `demo --keep` prints, as a user would paste it (as root: without sudo)."""
    argv = shlex.split(hint.split("  #", maxsplit=1)[0])
    assert argv[:2] == ["sudo", "nodeagent"], hint
    nodeagent = str(Path(sys.executable).with_name("nodeagent"))
    return subprocess.run([nodeagent, *argv[2:]], capture_output=True, text=True, timeout=timeout, check=False)


def test_keep_leaves_the_mesh_up_to_explore_until_ctrl_c() -> None:
    """`demo --keep`: the printed commands work on the running mesh, a policy written where it says is
    enforced, and Ctrl-C is the normal end (exit 0, everything removed)."""
    pins = _pins()
    proc = demo_popen("--keep", start_new_session=True)
    try:
        assert proc.stdout is not None
        seen = read_until(proc.stdout, "process logs:", timeout=120)  # also what a failed demo ends with
        assert "=== 10." in seen, seen[-3000:]
        hints = seen.split("=== 10.")[1].splitlines()
        curl = next(h for h in hints if "curl -s --http0.9" in h)
        answer = run_hint(curl)
        assert answer.returncode == 0 and answer.stdout.startswith("from 10.10.1.10: GET / HTTP/1.1"), answer
        vip = run_hint(next(h for h in hints if "VIP" in h))  # checkout's VIP: routed by the client's tunnel
        assert vip.returncode == 0 and vip.stdout.startswith("from 10.10.1.10: GET / HTTP/1.1"), vip
        services = run_hint(next(h for h in hints if "inspect services" in h))
        assert ["shop", "checkout", "10.96.0.10", "None", "1/1"] in [r.split() for r in services.stdout.splitlines()]
        connections = run_hint(next(h for h in hints if "inspect connections" in h))
        assert connections.returncode == 0 and "DIRECTION" in connections.stdout, connections
        verify = run_hint(next(h for h in hints if "inspect redirects --verify" in h))
        assert verify.returncode == 0 and "verified: no problems found" in verify.stdout, verify
        policies = Path(next(h for h in hints if h.startswith("policies:")).split(" to ")[1].split()[0])
        policies.write_text(DENY_FRONTEND)
        deadline = time.monotonic() + 10
        while run_hint(curl).returncode == 0:
            assert time.monotonic() < deadline, "the DENY policy written where the demo said was not enforced"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check above: end the demo as a user would, so its lab goes too
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "Ctrl-C: removing the mesh and the lab" in out and "demo done" in out
    assert "Traceback" not in err
    assert_host_clean(pins)


def test_an_unexpected_error_is_reported_not_a_traceback() -> None:
    pins = _pins()
    script = (
        "import sys, nodeagent.demo as d\n"
        "def boom(self): raise RuntimeError('injected failure')\n"
        "d.Demo.enrolled_ready = boom\n"
        "sys.exit(d.run_demo())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert proc.returncode == 1
    assert "demo failed: RuntimeError: injected failure" in proc.stdout
    assert "/run/nodeagent/demo/demo-traceback.txt" in proc.stdout
    assert "Traceback" not in proc.stderr
    # The logs stay for the user to read, the CA's private key does not.
    assert (RUN / "demo-traceback.txt").exists() and list(RUN.glob("*.log"))
    assert not list(RUN.rglob("*key*")), sorted(str(p) for p in RUN.rglob("*"))
    shutil.rmtree(RUN, ignore_errors=True)
    assert_host_clean(pins)


def test_a_waiting_demo_leaves_the_running_demos_files_alone() -> None:
    """A second demo waits for the lab lock before it touches anything, RUN included (here the test session
    holds the lock, standing in for a first demo whose working directory RUN is)."""
    RUN.mkdir(parents=True, exist_ok=True)
    sentinel = RUN / "tunnel-node1.log"
    sentinel.write_text("the first demo's log\n")
    env = {k: v for k, v in os.environ.items() if k != LAB_LOCK_HELD_ENV}
    proc = demo_popen(env=env)
    try:
        read_until(proc.stderr, "waiting for /run/nodeagent-lab.lock", timeout=30)  # type: ignore[arg-type]
        time.sleep(0.5)
        assert sentinel.read_text() == "the first demo's log\n"
        proc.send_signal(signal.SIGTERM)  # stopped while waiting: it must not touch the lab either
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM
        assert "lab down" not in out
        assert sentinel.exists()
    finally:
        proc.kill()
        shutil.rmtree(RUN, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN.parent.rmdir()


def test_the_demo_refuses_to_remove_a_users_lab() -> None:
    nodeagent = str(Path(sys.executable).with_name("nodeagent"))
    subprocess.run([nodeagent, "lab", "up"], check=True, capture_output=True, timeout=60)
    sleeper = subprocess.Popen([nodeagent, "lab", "exec", "shop/frontend", "--", "sleep", "300"])
    try:
        time.sleep(0.5)
        proc = subprocess.run(
            [sys.executable, "-m", "nodeagent.cli", "demo"], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 1
        assert "a lab is already up on this host" in proc.stdout and "sudo nodeagent lab down" in proc.stdout
        assert sleeper.poll() is None, "the user's process in the lab was stopped"
        status = subprocess.run([nodeagent, "lab", "status"], capture_output=True, text=True, timeout=60, check=False)
        assert status.returncode == 0, status.stderr
    finally:
        subprocess.run([nodeagent, "lab", "down"], check=False, capture_output=True, timeout=60)
        sleeper.kill()
        sleeper.wait()


FAKE_TCPDUMP = {
    # Only the capture (`-w`) is faked; `tcpdump -r` (the demo's reading of the pcap) runs the real one.
    "dies": 'echo "tcpdump: br0: No such device exists" >&2; exit 1',
    "blind": 'exec "$REAL" "$@" and port 1',  # listens, but its filter matches none of the demo's packets
    "slow": 'sleep 3; exec "$REAL" "$@"',  # a loaded host: capturing starts seconds later
}


@pytest.mark.parametrize("mode", FAKE_TCPDUMP)
def test_tcpdump_that_saw_nothing_is_not_plaintext(tmp_path: Path, mode: str) -> None:
    real = shutil.which("tcpdump")
    assert real
    fake = tmp_path / "tcpdump"
    fake.write_text(
        f'#!/bin/sh\nREAL={real}\ncase " $* " in *" -w "*) ;; *) exec "$REAL" "$@";; esac\n{FAKE_TCPDUMP[mode]}\n'
    )
    fake.chmod(0o755)
    pins = _pins()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env=env,
        check=False,
    )
    out = proc.stdout
    assert "PLAINTEXT SEEN" not in out and "carried plaintext" not in out, out[-3000:]
    if mode == "slow":
        assert proc.returncode == 0, out[-3000:]
        assert "=> only mTLS to port 15008 between enrolled pods" in out
    elif mode == "dies":
        assert proc.returncode == 1
        assert "demo failed: tcpdump exited with 1 before capturing" in out and "No such device" in out
    else:
        assert proc.returncode == 1
        assert "demo failed: tcpdump captured nothing between shop/frontend and shop/checkout" in out
    if mode != "slow":  # a failed demo keeps its logs for the user, never the CA's private key
        assert "process logs: /run/nodeagent/demo/*.log" in out and list(RUN.glob("*.log"))
        assert not list(RUN.rglob("*key*")), sorted(str(p) for p in RUN.rglob("*"))
        shutil.rmtree(RUN, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN.parent.rmdir()
    assert_host_clean(pins)
