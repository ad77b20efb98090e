"""The whole mesh as real processes in a lab: a CA, and per node a node agent and a tunnel.

Why this module exists: the demo, the end-to-end privileged tests and the benchmark all need the same
thing — the production commands (`nodeagent ca serve`, `nodeagent agent`, `nodeagent tunnel`) running
inside the lab's node namespaces, wired together (CA on node1's fabric address, one ZDS socket per node,
the lab inventory as the workload source) — and then to poke at them: enroll a namespace, kill or
restart a tunnel or an agent, hand a node over to a second tunnel. `Mesh` does that and nothing more:

    lab = Lab.up(topology)
    with Mesh(lab, Path("/run/nodeagent/e2e")).start() as mesh:   # CA, agents and tunnels, all ready
        mesh.enroll("shop")                                      # rewrites the lab inventory
        mesh.wait_enabled(["shop/frontend", "shop/checkout"])    # the agents say their tunnel acked
        old = mesh.tunnel("node1")
        new = mesh.start_tunnel("node1", name="tunnel-node1-b", port_offset=100)  # hand-over
        mesh.kill(old, signal.SIGTERM)
        mesh.restart_agent("node1", signal.SIGKILL)
    # stop(): every process it started is ended (SIGTERM, then SIGKILL)

Every process writes its output to `<run_dir>/<name>.log`; `Proc.spawned` is the monotonic time just
before it was started (for "within N seconds of the restart" measurements). The waits poll and raise
`MeshError` with the log tail of any mesh process that died unexpectedly.

What it deliberately does not do: it is a driver, not an oracle — its waits read the agents' status
files and the tunnels' readiness endpoints (the code under test); tests check outcomes with the kernel's
own tools. It builds no lab (the caller passes one and tears it down) and runs no apps in pods (the
caller does; `spawn` keeps such helpers' logs and lifetimes with the mesh's).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from nodeagent.agent.status import read_status, status_path
from nodeagent.lab.cluster import Lab
from nodeagent.model import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from nodeagent.netns import in_netns

NODEAGENT = [sys.executable, "-m", "nodeagent.cli"]
CA_PORT = 15012
ADMIN_PORT, METRICS_PORT, READY_PORT = 15000, 15020, 15021
AGENT_METRICS_PORT = 15014
SURGE_PORT_OFFSET = 100  # a second agent beside a running one (a rolling update's surge pod) listens here above
STOP_GRACE_S = 5.0


class MeshError(Exception):
    """The mesh did not come up or did not reach a state in time; the message says which and why."""


@dataclass(eq=False)
class Proc:
    """One process started by the mesh. `kind` is ca | tunnel | agent | aux."""

    name: str
    kind: str
    node: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    spawned: float  # time.monotonic() just before the process was started
    ready_port: int | None = None  # tunnels: the readiness port in the node's netns
    metrics_port: int | None = None  # agents and tunnels: the /metrics port in the node's netns
    expect_exit: bool = False  # killed on purpose (or an aux process): its exit is no failure
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Mesh:
    """The mesh's processes for `lab`, with state, sockets and logs under `run_dir` (see the module doc).

    capture: the agents' --capture backend. spoof: the tunnels connect to apps from the client's IP.
    tunnel_grace: the tunnels' --grace (drain keeps established connections for grace - 5 s).
    verify_interval / inventory_poll: the agents' periodic kernel check and inventory file poll.
    kubeconfig: Kubernetes mode — the agents and tunnels watch the API server it names (the tests' stand-in)
    instead of the lab inventory; the CA keeps the inventory's node tokens.
    tunnel_wrapper: a command line every tunnel's own is appended to, run inside the node's netns (tests:
    `setpriv` to run the tunnels with only a DaemonSet container's capabilities); empty runs them directly.
    """

    def __init__(
        self,
        lab: Lab,
        run_dir: Path,
        *,
        capture: str = "iptables",
        spoof: bool = True,
        tunnel_grace: float | None = None,
        verify_interval: float = 2.0,
        inventory_poll: float | None = None,
        kubeconfig: Path | None = None,
        policies: Path | None = None,
        tunnel_wrapper: Sequence[str] = (),
    ) -> None:
        self.lab = lab
        self.run_dir = run_dir
        self.capture = capture
        self.spoof = spoof
        self.tunnel_grace = tunnel_grace
        self.verify_interval = verify_interval
        self.inventory_poll = inventory_poll
        self.kubeconfig = kubeconfig
        self.policies = policies  # the tunnels' --policies (Istio YAML, reloaded when it changes)
        self.tunnel_wrapper = list(tunnel_wrapper)
        self.procs: list[Proc] = []
        self.ready_after: dict[str, float] = {}  # node -> seconds from start() until its tunnel was ready
        self._tunnels: dict[str, Proc] = {}  # the newest tunnel per node
        self._agents: dict[str, Proc] = {}
        self.ca_state = run_dir / "ca"
        self.agent_state = run_dir / "agent"
        node0 = lab.inventory.nodes[0]
        self.ca_node = node0.name
        self.ca_address = f"{node0.address}:{CA_PORT}"

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Mesh:
        """Start the CA, then per node a tunnel and an agent; return once every tunnel is ready."""
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trust_domain = self.lab.inventory.trust_domain
        self._run([*NODEAGENT, "ca", "init", "--state-dir", str(self.ca_state), "--trust-domain", trust_domain])
        ca_argv = [
            *NODEAGENT, "ca", "serve", "--state-dir", str(self.ca_state),
            "--inventory", str(self.lab.inventory_path), "--listen", self.ca_address,
        ]  # fmt: skip
        self._spawn("ca", "ca", self.ca_node, self.lab.node_exec_argv(self.ca_node, ca_argv))
        tokens = {c.node: c.token for c in self.lab.inventory.node_credentials}
        for node in self.nodes:
            token_file = self.run_dir / node / "ca-token"
            token_file.parent.mkdir(parents=True, exist_ok=True)
            token_file.write_text(tokens[node])
            token_file.chmod(0o600)
            self.start_tunnel(node, wait=False)
            self.start_agent(node, wait=False)
        for node in self.nodes:
            self.wait_tunnel_ready(self._tunnels[node], timeout=max(1.0, timeout - (time.monotonic() - t0)))
            self.ready_after[node] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """End every process the mesh started: SIGTERM, then SIGKILL after a grace."""
        for proc in reversed(self.procs):
            proc.expect_exit = True
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.wait(5)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nodes(self) -> list[str]:
        return [n.name for n in self.lab.inventory.nodes]

    # -- processes -----------------------------------------------------------------------------------------

    def tunnel(self, node: str) -> Proc:
        """The newest tunnel started on `node`."""
        return self._tunnels[node]

    def agent(self, node: str) -> Proc:
        return self._agents[node]

    def zds_socket(self, node: str) -> Path:
        return self.run_dir / node / "ztunnel.sock"

    def start_tunnel(
        self,
        node: str,
        name: str | None = None,
        *,
        port_offset: int = 0,
        grace: float | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> Proc:
        """Start a tunnel on `node` (it becomes `tunnel(node)`); with `wait`, return once it is ready.

        A second tunnel on a node (hand-over) shares the pod ports through SO_REUSEPORT, but its admin,
        metrics and readiness ports in the node's netns must differ: pass `port_offset`.
        """
        grace = self.tunnel_grace if grace is None else grace
        argv = [
            *NODEAGENT, "tunnel", "--node", node, *self._source(),
            "--zds-socket", str(self.zds_socket(node)), "--ca", self.ca_address,
            "--ca-token-file", str(self.run_dir / node / "ca-token"),
            "--trust-bundle", str(self.ca_state / "trust-bundle.pem"),
            "--admin", f"127.0.0.1:{ADMIN_PORT + port_offset}", "--metrics", f":{METRICS_PORT + port_offset}",
            "--ready", f":{READY_PORT + port_offset}",
            *(["--spoof"] if self.spoof else []), *(["--grace", str(grace)] if grace is not None else []),
            *(["--policies", str(self.policies)] if self.policies is not None else []),
        ]  # fmt: skip
        argv = [*self.tunnel_wrapper, *argv]
        proc = self._spawn(name or f"tunnel-{node}", "tunnel", node, self.lab.node_exec_argv(node, argv))
        proc.ready_port = READY_PORT + port_offset
        proc.metrics_port = METRICS_PORT + port_offset
        self._tunnels[node] = proc
        if wait:
            self.wait_tunnel_ready(proc, timeout)
        return proc

    def start_agent(
        self,
        node: str,
        name: str | None = None,
        *,
        port_offset: int | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> Proc:
        """Start `node`'s agent (it becomes `agent(node)`); with `wait`, return once its status file says this
        process is ready. A second agent beside a running one (a rolling update's surge pod) needs `name`:
        each process keeps a log of its own. Its metrics port (AGENT_METRICS_PORT + `port_offset`, in the
        node's netns) must differ from the running one's too: by default the offset is SURGE_PORT_OFFSET while
        an agent this mesh started still runs on `node`, else 0."""
        if port_offset is None:
            running = self._agents.get(node)
            port_offset = SURGE_PORT_OFFSET if running is not None and running.alive() else 0
        argv = [
            *NODEAGENT, "agent", "--node", node, *self._source(),
            "--zds-socket", str(self.zds_socket(node)), "--state-dir", str(self.agent_state),
            "--capture", self.capture, "--verify-interval", str(self.verify_interval),
            "--metrics", f":{AGENT_METRICS_PORT + port_offset}",
            *(["--inventory-poll", str(self.inventory_poll)] if self.inventory_poll is not None else []),
        ]  # fmt: skip
        proc = self._spawn(name or f"agent-{node}", "agent", node, self.lab.node_exec_argv(node, argv))
        proc.metrics_port = AGENT_METRICS_PORT + port_offset
        self._agents[node] = proc
        if wait:
            self.wait(f"the agent on {node} to be ready", functools.partial(self.agent_ready, node), timeout)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL, *, wait: bool = True, timeout: float = 40.0) -> int | None:
        """Send `sig` to one of the mesh's processes; with `wait`, reap it and return its exit code."""
        proc.expect_exit = True
        proc.signal(sig)
        return proc.wait(timeout) if wait else None

    def kill_tunnel(self, node: str, sig: int = signal.SIGKILL, *, wait: bool = True) -> int | None:
        return self.kill(self.tunnel(node), sig, wait=wait)

    def restart_tunnel(self, node: str, sig: int = signal.SIGKILL, *, wait: bool = True) -> Proc:
        """Stop `node`'s tunnel with `sig` (and reap it), then start a new one (`Proc.spawned` says when)."""
        self.kill_tunnel(node, sig)
        return self.start_tunnel(node, wait=wait)

    def restart_agent(self, node: str, sig: int = signal.SIGTERM, *, wait: bool = True) -> Proc:
        """Stop `node`'s agent with `sig` (and reap it), then start a new one; with `wait`, until ready."""
        self.kill(self.agent(node), sig)
        return self.start_agent(node, wait=wait)

    def spawn(self, name: str, argv: list[str]) -> Proc:
        """An auxiliary process (an app in a pod, tcpdump): logged to `<name>.log`, ended by stop()."""
        proc = self._spawn(name, "aux", "", argv)
        proc.expect_exit = True
        return proc

    # -- enrollment ----------------------------------------------------------------------------------------

    def enroll(self, namespace: str) -> None:
        """Label `namespace` istio.io/dataplane-mode=ambient in the lab inventory (an atomic rewrite)."""
        self.set_namespace_label(namespace, DATAPLANE_MODE_AMBIENT)

    def unenroll(self, namespace: str) -> None:
        self.set_namespace_label(namespace, None)

    def set_namespace_label(self, namespace: str, value: str | None) -> None:
        def change(data: dict[str, Any]) -> None:
            for ns in data.get("namespaces") or []:
                if ns["name"] == namespace:
                    labels = ns.get("labels") or {}
                    if value is None:
                        labels.pop(DATAPLANE_MODE_LABEL, None)
                    else:
                        labels[DATAPLANE_MODE_LABEL] = value
                    ns["labels"] = labels
                    return
            raise MeshError(f"no namespace {namespace!r} in {self.lab.inventory_path}")

        self.edit_inventory(change)

    def edit_inventory(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply `change` to the inventory's YAML data and write it back atomically (a rename)."""
        path = self.lab.inventory_path
        # libyaml when present: the benchmark times "inventory edited -> pod enabled" from before this call,
        # and pure-Python YAML would add ~10 ms of the driver's own work to the agent's figure.
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        change(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))
        os.replace(tmp, path)

    # -- state, as the mesh's own processes report it ------------------------------------------------------

    def status(self, node: str) -> dict[str, Any] | None:
        """`node`'s agent status document (see nodeagent.agent.status)."""
        return read_status(status_path(self.agent_state, node))

    def pod_status(self, pod: str) -> str | None:
        """enabled | pending | ... for `namespace/name`, from its node's agent; None when not enrolled."""
        found = self.lab.inventory.pod(pod)
        for entry in ((self.status(found.node) or {}).get("pods") or {}).values():
            if entry["namespace"] == found.namespace and entry["name"] == found.name:
                return str(entry["status"])
        return None

    def agent_ready(self, node: str) -> bool:
        doc = self.status(node)
        proc = self._agents.get(node)
        return bool(doc and proc and doc.get("ready") and doc.get("running") and doc.get("pid") == proc.pid)

    def tunnel_ready(self, proc: Proc) -> bool:
        return self.node_get(proc.node, f"http://127.0.0.1:{proc.ready_port}/healthz/ready")[0] == 200

    def metrics(self, proc: Proc) -> str:
        """The Prometheus text an agent or a tunnel serves on its /metrics, read inside its node's netns."""
        if proc.metrics_port is None:
            raise MeshError(f"{proc.name} serves no metrics")
        status, body = self.node_get(proc.node, f"http://127.0.0.1:{proc.metrics_port}/metrics")
        if status != 200:
            raise MeshError(f"GET /metrics of {proc.name} on {proc.node}: {status or 'no answer'} {body.strip()}")
        return body

    def node_get(self, node: str, url: str) -> tuple[int, str]:
        """GET `url` from inside `node`'s netns: (status, body); status 0 when nothing answered."""

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError as exc:
                return 0, str(exc)

        return in_netns(self.lab.node_netns(node), get)

    # -- waiting ---------------------------------------------------------------------------------------------

    def wait_tunnel_ready(self, proc: Proc, timeout: float = 30.0) -> float:
        return self.wait(f"{proc.name} to be ready", functools.partial(self.tunnel_ready, proc), timeout)

    def wait_enabled(self, pods: Iterable[str], timeout: float = 30.0) -> float:
        """Wait until every pod (`namespace/name`) is `enabled` (captured and acked by a tunnel)."""
        pods = list(pods)
        return self.wait(
            f"{', '.join(pods)} to be enabled", lambda: all(self.pod_status(p) == "enabled" for p in pods), timeout
        )

    def wait_released(self, pods: Iterable[str], timeout: float = 30.0) -> float:
        """Wait until no agent lists any of `pods` any more (unenrolled)."""
        pods = list(pods)
        return self.wait(
            f"{', '.join(pods)} to be released", lambda: all(self.pod_status(p) is None for p in pods), timeout
        )

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> float:
        """Poll `check` until true; seconds waited. MeshError on timeout or if a mesh process died."""
        t0 = time.monotonic()
        while True:
            self.check_alive()
            if check():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise MeshError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def check_alive(self) -> None:
        """MeshError, with its log's tail, if a mesh process exited that nobody stopped."""
        for proc in self.procs:
            if not proc.expect_exit and proc.popen.poll() is not None:
                tail = proc.log()[-1500:]
                raise MeshError(f"{proc.name} exited with {proc.popen.returncode}; its log ends:\n{tail}")

    # -- internals -------------------------------------------------------------------------------------------

    def _source(self) -> list[str]:
        """The workload source arguments of agents and tunnels."""
        if self.kubeconfig is not None:
            return ["--kubernetes", "--kubeconfig", str(self.kubeconfig)]
        return ["--inventory", str(self.lab.inventory_path)]

    def _spawn(self, name: str, kind: str, node: str, argv: list[str]) -> Proc:
        log_path = self.run_dir / f"{name}.log"
        again = any(p.name == name for p in self.procs)  # a restart appends to its predecessor's log
        log = open(log_path, "ab" if again else "wb")  # noqa: SIM115 - closed when the process is reaped
        spawned = time.monotonic()
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = Proc(name, kind, node, argv, log_path, popen, spawned, _log=log)
        self.procs.append(proc)
        return proc

    def _run(self, argv: list[str], timeout: float = 30) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise MeshError(f"{' '.join(argv[-4:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout
