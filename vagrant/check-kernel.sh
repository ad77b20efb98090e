#!/usr/bin/env bash
# Refuse a box whose kernel cannot run nodeagent's eBPF capture: Linux >= 6.1 with BTF.
set -euo pipefail
release=$(uname -r)
major=${release%%.*}
rest=${release#*.}
minor=${rest%%.*}
if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 1 ]; }; then
  echo "kernel $release is older than 6.1; use a newer box (NODEAGENT_BOX)" >&2
  exit 1
fi
[ -r /sys/kernel/btf/vmlinux ] || { echo "kernel $release has no BTF (/sys/kernel/btf/vmlinux)" >&2; exit 1; }
echo "kernel $release with BTF: ok"
