"""daemonset/: every manifest validates offline against the Kubernetes 1.37 schemas, the kustomization renders,
the DaemonSet follows the conventions of privileged network agents (REFERENCE.md), and the image's scripts
pass shellcheck.

The kustomization is rendered by a minimal renderer of the features it uses (`resources`, `namespace`,
`labels`) — kubectl is not installed on these machines and is not required.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nodeagent.agent import commands as agent_commands

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
K8S_VERSION = "1.37.0"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}
# Created by the operator before `kubectl apply -k` (the root key never lives in the repository).
OPERATOR_CREATED = {("Secret", "nodeagent-ca-root"), ("ConfigMap", "nodeagent-trust-bundle")}


CRDS = DAEMONSET / "istio-crds"  # a kustomization of its own: never applied where Istio runs


def manifest_files(directory: Path = DAEMONSET) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path = DAEMONSET) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` for the features the kustomization uses; anything else is an error."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    unsupported = set(k) - {"apiVersion", "kind", "namespace", "resources", "labels"}
    assert not unsupported, f"the test's renderer does not implement {unsupported}"
    out = []
    for resource in k["resources"]:
        for doc in load(directory / resource):
            meta = doc.setdefault("metadata", {})
            if doc["kind"] not in CLUSTER_SCOPED and "namespace" in k:
                meta["namespace"] = k["namespace"]
            for group in k.get("labels", []):
                meta.setdefault("labels", {}).update(group["pairs"])
            out.append(doc)
    return out


@pytest.mark.parametrize("path", [*manifest_files(), *manifest_files(CRDS)], ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            # A custom resource: no upstream schema; it was parsed above, and its CRD is validated.
            assert doc["apiVersion"].startswith("security.istio.io/"), f"no schema for {doc['kind']}"


def test_kustomization_renders_every_manifest_once() -> None:
    listed = set(yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in manifest_files()}, "every manifest is in kustomization.yaml, and only those"
    objects = render()
    keys = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for o in objects:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == "nodeagent-system"
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nodeagent"
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in render() if o["kind"] == kind and o["metadata"]["name"] == name)


def test_references_resolve() -> None:
    objects = render()
    present = {(o["kind"], o["metadata"]["name"]) for o in objects} | OPERATOR_CREATED
    for o in objects:
        if o["kind"] not in ("DaemonSet", "Deployment"):
            continue
        spec = o["spec"]["template"]["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in present
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in present
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in present
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for ref in c.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in present
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        assert ("ClusterRole", binding["roleRef"]["name"]) in present
        for s in binding["subjects"]:
            assert ("ServiceAccount", s["name"]) in present


def test_namespace_allows_privileged_pods() -> None:
    labels = by_kind("Namespace", "nodeagent-system")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_daemonset_conventions() -> None:
    ds = by_kind("DaemonSet", "nodeagent")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] == 30
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "15020"
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"agent", "tunnel"}
    for c in containers.values():
        assert "livenessProbe" not in c, "no liveness probe for the data plane"
        sc = c["securityContext"]
        assert sc.get("privileged") is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON"} <= set(
        containers["agent"]["securityContext"]["capabilities"]["add"]
    )
    # Readiness of each container through its own process's socket in a pod-private volume: the node's
    # :15021 belongs to whichever tunnel bound it first, and the ZDS socket (a hostPath) to whichever agent
    # bound it last - during a rolling update, the old pod's. The tunnel alone is ready on the old agent's
    # snapshot, so the agent must be asked too. tests/integration/test_tunnel_drain.py and
    # test_agent_ready.py run these commands against a real tunnel and agent.
    for name in ("agent", "tunnel"):
        assert_ready_probe_on_own_socket(pod, containers[name])
    assert re.search(r"\bcurl\b", (DAEMONSET / "Dockerfile").read_text()), "the probe needs curl in the image"
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {v["hostPath"]["path"]: name for name, v in volumes.items() if "hostPath" in v}
    for needed in ("/proc", "/var/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src"):
        assert needed in paths, f"host path {needed} is not mounted"
    agent_mounts = {m["name"]: m for m in containers["agent"]["volumeMounts"]}
    assert agent_mounts[paths["/proc"]]["readOnly"] is True
    assert agent_mounts[paths["/var/run/netns"]]["mountPropagation"] == "HostToContainer"
    tunnel_mounts = {m["name"]: m for m in containers["tunnel"]["volumeMounts"]}
    assert paths["/sys/fs/bpf"] in tunnel_mounts, "eBPF-captured pods need the pins in the tunnel too"
    # The tunnel gets each pod's netns as an fd over ZDS: it needs neither the host's /proc and netns files
    # nor SYS_PTRACE to open them (tests/privileged/test_tunnel_capabilities.py runs it without them).
    assert not {paths["/proc"], paths["/var/run/netns"]} & set(tunnel_mounts)
    assert "SYS_PTRACE" not in containers["tunnel"]["securityContext"]["capabilities"]["add"]
    # Both set sysctls in pod netns (eBPF capture, hand-over) through a writable mount of /proc/sys/net:
    # their own /proc/sys is read-only.
    for name in ("agent", "tunnel"):
        [arg] = [a for a in containers[name]["args"] if a.startswith("--sysctl-net=")]
        [mount] = [m for m in containers[name]["volumeMounts"] if m["mountPath"] == arg.split("=", 1)[1]]
        assert not mount.get("readOnly") and volumes[mount["name"]]["hostPath"]["path"] == "/proc/sys/net"
    # The tunnel drains until grace minus its own margin: its --grace is the pod's grace period.
    assert "--grace=30" in containers["tunnel"]["args"]
    # `command` replaces the image's ENTRYPOINT: the agent (bcc) must still run the kernel-header step.
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', (DAEMONSET / "Dockerfile").read_text(), re.M)
    assert entrypoint is not None and containers["agent"]["command"][0] == entrypoint.group(1)
    token = next(v for v in pod["volumes"] if v["name"] == "ca-token")["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"


def agent_command_line() -> argparse.Namespace:
    """The agent container's command and args as `nodeagent agent` parses them, $(VAR)s from its env and the
    ConfigMap (the image's entrypoint script and `nodeagent agent` itself stripped off)."""
    containers = {c["name"]: c for c in by_kind("DaemonSet", "nodeagent")["spec"]["template"]["spec"]["containers"]}
    agent = containers["agent"]
    env = {**by_kind("ConfigMap", "nodeagent-config")["data"], "NODE_NAME": "node1"}
    words = [*agent["command"], *agent["args"]]
    words = words[words.index("agent") + 1 :]
    words = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], w) for w in words]
    parser = argparse.ArgumentParser()
    agent_commands.register(parser.add_subparsers())
    return parser.parse_args(["agent", *words])


def test_the_agent_serves_metrics_on_15014_and_no_port_is_declared() -> None:
    """The agent's metrics on istio-cni's port, in every address (Prometheus scrapes the node's IP). Not as a
    declared container port: on hostNetwork that is a hostPort, and the scheduler keeps a rolling update's
    surge pod off the node while the old pod holds it - the update (maxUnavailable 0) would stall. So the
    DaemonSet says how to scrape it instead (a PodMonitor relabeling the address)."""
    pod = by_kind("DaemonSet", "nodeagent")["spec"]["template"]["spec"]
    [agent] = [c for c in pod["containers"] if c["name"] == "agent"]
    assert "--metrics=:15014" in agent["args"], "said, not left to the default: the scrape note names the port"
    assert agent_command_line().metrics == ("0.0.0.0", 15014)
    assert pod["hostNetwork"] is True
    for c in pod["containers"]:
        assert not c.get("ports"), f"the {c['name']} container declares ports: hostPorts on hostNetwork"
    text = (DAEMONSET / "daemonset.yaml").read_text()
    assert "PodMonitor" in text and '"$1:15014"' in text, "the DaemonSet says how to scrape the agent's 15014"


def assert_ready_probe_on_own_socket(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """`container` is started with --ready-socket=PATH, its exec readiness probe curls /healthz/ready on that
    PATH, and PATH lies in an emptyDir (this pod's alone) mounted in the container."""
    name = container["name"]
    socket_args = [a for a in container["args"] if a.startswith("--ready-socket=")]
    assert len(socket_args) == 1, f"the {name} container is not started with one --ready-socket=PATH"
    ready_socket = socket_args[0].split("=", 1)[1]
    assert "readinessProbe" in container, f"the {name} container has no readiness probe"
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["curl", "-sf"] and command[-1].endswith("/healthz/ready")
    assert command[command.index("--unix-socket") + 1] == ready_socket, f"{name}: the probe asks another socket"
    [run_mount] = [m for m in container["volumeMounts"] if ready_socket.startswith(m["mountPath"] + "/")]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == run_mount["name"])


def test_ca_deployment_and_service() -> None:
    svc = by_kind("Service", "nodeagent-ca")
    assert [p["port"] for p in svc["spec"]["ports"]] == [15012]
    dep = by_kind("Deployment", "nodeagent-ca")
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "nodeagent-ca-root" for v in volumes)


def test_rbac_is_least_privilege_and_commented() -> None:
    text = (DAEMONSET / "rbac.yaml").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("verbs:"):
            assert lines[i - 1].strip().startswith("#"), f"rbac.yaml line {i + 1}: say what these verbs are for"
    for role in (o for o in load(DAEMONSET / "rbac.yaml") if o["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert not set(rule["verbs"]) & {"create", "update", "delete", "deletecollection"} or rule["resources"] == [
                "tokenreviews"
            ]
            assert "secrets" not in rule["resources"]
    agent = next(o for o in load(DAEMONSET / "rbac.yaml") if o["metadata"]["name"] == "nodeagent")
    assert {"resources": ["pods/status"], "verbs": ["patch"], "apiGroups": [""]} in agent["rules"]


def test_crds_cover_the_istio_security_kinds_and_are_not_applied_with_the_rest() -> None:
    """Applied over Istio's own CRDs (which serve v1beta1 too) they would take versions away from Istio."""
    assert not any(o["kind"] == "CustomResourceDefinition" for o in render())
    rendered = render(CRDS)
    assert {o["metadata"]["labels"]["app.kubernetes.io/part-of"] for o in rendered} == {"nodeagent"}
    crds = {d["spec"]["names"]["kind"]: d for d in rendered}
    assert set(crds) == {"AuthorizationPolicy", "PeerAuthentication"}
    for crd in crds.values():
        assert crd["spec"]["group"] == "security.istio.io"
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]


def test_a_custom_resource_parses_and_is_skipped_by_schema() -> None:
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"action": "DENY"},
    }
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(policy, K8S_VERSION, strict=True)


def test_grafana_dashboard() -> None:
    dash = json.loads((DAEMONSET / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for metric in ("opened", "closed", "sent_bytes", "received_bytes"):
        assert any(re.search(rf"istio_tcp_(connections_)?{metric}", e) for e in exprs), metric


def test_dockerfile() -> None:
    text = (DAEMONSET / "Dockerfile").read_text()
    assert re.search(r"^FROM \S*debian:bookworm", text, re.M)
    assert "python3-bpfcc" in text
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


def shellcheck(paths: list[Path]) -> None:
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck is not installed: run `sudo make setup` (it installs the Debian package)")
    result = subprocess.run([exe, "-x", *map(str, paths)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_scripts_pass_shellcheck() -> None:
    scripts = sorted((DAEMONSET / "image").glob("*.sh"))
    assert scripts
    shellcheck(scripts)
