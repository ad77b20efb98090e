#!/bin/sh
# Entrypoint of the nodeagent image: make sure bcc finds headers for the running kernel, then exec "$@".
#
# bcc looks in /lib/modules/$(uname -r)/build. Nodes with the distro's header package have it (mounted
# from the host). Otherwise this script unpacks the headers the kernel itself carries when built with
# CONFIG_IKHEADERS (/sys/kernel/kheaders.tar.xz, or after `modprobe kheaders`) into a writable directory
# and points bcc at it with BCC_KERNEL_SOURCE. Without either, eBPF capture is unavailable and the
# agent falls back to (or must be configured with) iptables capture; this script says so and goes on.
set -eu

release=$(uname -r)
build="/lib/modules/$release/build"
cache="${KHEADERS_CACHE:-/tmp/kheaders/$release}"

log() { printf 'kernel-headers: %s\n' "$*" >&2; }

if [ -e "$build/include/linux/kconfig.h" ]; then
  :
elif [ -e "$cache/include/linux/kconfig.h" ]; then
  export BCC_KERNEL_SOURCE="$cache"
else
  tarball=/sys/kernel/kheaders.tar.xz
  if [ ! -e "$tarball" ] && command -v modprobe >/dev/null 2>&1; then
    modprobe kheaders 2>/dev/null || true
  fi
  if [ -e "$tarball" ]; then
    mkdir -p "$cache"
    if tar -xJf "$tarball" -C "$cache" 2>/dev/null; then
      export BCC_KERNEL_SOURCE="$cache"
      log "using headers unpacked from $tarball into $cache"
    else
      log "could not unpack $tarball; eBPF capture will not compile (iptables capture still works)"
    fi
  else
    log "no headers for $release (no $build, no $tarball); eBPF capture unavailable, use --capture iptables"
  fi
fi

exec "$@"
