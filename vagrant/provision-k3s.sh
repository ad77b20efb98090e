#!/usr/bin/env bash
# Install a single-node k3s (its own containerd; no docker anywhere) and the tools the checks use.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl ca-certificates tcpdump iptables jq buildah \
  "linux-headers-$(uname -r)" >/dev/null
if ! command -v k3s >/dev/null; then
  # Traefik and the service LB are not needed; flannel is k3s's default CNI.
  curl -sfL https://get.k3s.io | INSTALL_K3S_EXEC="--disable traefik --disable servicelb --write-kubeconfig-mode 0644" sh -
fi
for _ in $(seq 1 120); do
  if k3s kubectl get nodes 2>/dev/null | grep -q ' Ready'; then break; fi
  sleep 2
done
k3s kubectl get nodes -o wide
