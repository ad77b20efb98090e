#!/usr/bin/env bash
# Create the CA root (Secret) and trust bundle (ConfigMap), then apply daemonset/ (kustomize).
set -euo pipefail
src=${1:-/nodeagent}
kubectl() { k3s kubectl "$@"; }
ns=nodeagent-system
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

kubectl apply -f "$src/daemonset/namespace.yaml"
if ! kubectl -n "$ns" get secret nodeagent-ca-root >/dev/null 2>&1; then
  # A fresh root made by the image's own CLI: `ca init` writes Istio's cacerts layout
  # (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) under STATE_DIR/ca.
  k3s ctr run --rm --mount "type=bind,src=$work,dst=/out,options=rbind:rw" docker.io/library/nodeagent:dev ca-init \
    sh -c 'nodeagent ca init --state-dir /tmp/ca >/dev/null && cp /tmp/ca/ca/*.pem /out/'
  kubectl -n "$ns" create secret generic nodeagent-ca-root --from-file="$work"
fi
if ! kubectl -n "$ns" get configmap nodeagent-trust-bundle >/dev/null 2>&1; then
  kubectl -n "$ns" get secret nodeagent-ca-root -o jsonpath='{.data.root-cert\.pem}' | base64 -d > "$work/root-cert.pem"
  kubectl -n "$ns" create configmap nodeagent-trust-bundle --from-file=root-cert.pem="$work/root-cert.pem"
fi
kubectl apply -k "$src/daemonset/istio-crds"  # this cluster has no Istio: nodeagent's copy of its policy CRDs
kubectl apply -k "$src/daemonset"
kubectl -n "$ns" rollout status deployment/nodeagent-ca --timeout=180s
kubectl -n "$ns" rollout status daemonset/nodeagent --timeout=300s
