#!/usr/bin/env bash
# make setup: install everything nodeagent needs on a Debian 12 machine, as root. Idempotent: a second
# run checks and returns in a few seconds.
#
# - Debian packages: bcc's Python bindings (python3-bpfcc; the PyPI package named "bcc" is an unrelated
#   library), bpftool, iproute2, iptables/nftables, tcpdump, iperf3, sockperf, stunnel4, nghttp2 tools,
#   shellcheck, strace (a privileged test's oracle), and the distro's kernel headers.
# - Kernel headers for bcc: where /lib/modules/$(uname -r)/build is missing (kernels built without
#   packaged headers), link Debian's linux-headers tree there; bcc compiles networking programs with it.
# - The Python environment: .venv with the project and its pinned dev tools, `import bcc` linked in, and
#   /usr/local/bin/nodeagent pointing at it so `sudo nodeagent ...` works.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo make setup"
command -v apt-get >/dev/null || die "this setup supports Debian/Ubuntu (apt-get); install the packages listed in scripts/setup.sh by hand"

apt_packages=(
  python3-bpfcc bpfcc-tools bpftool linux-headers-amd64
  iproute2 iptables nftables tcpdump iperf3 sockperf stunnel4 nghttp2-proxy nghttp2-client
  shellcheck procps psmisc kmod python3-venv ruby nodejs strace
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers for bcc.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  arch_dir=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -type d | sort -V | tail -n 1)
  common_dir=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-common' -type d | sort -V | tail -n 1)
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || die "no kernel headers under /usr/src; apt-get install linux-headers-amd64"
  log "linking kernel headers for bcc: $kdir/{build,source} -> $arch_dir, $common_dir"
  mkdir -p "$kdir"
  ln -sfn "$arch_dir" "$kdir/build"
  ln -sfn "$common_dir" "$kdir/source"
fi

# Python >= 3.11 for the venv: the first python3 on PATH, else Debian's.
py=""
for cand in python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=$(command -v "$cand"); break
  fi
done
[ -n "$py" ] || die "need Python >= 3.11 with the venv module"

stamp="$venv/.nodeagent-setup"
want=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating the Python environment in .venv with $py"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]"
  echo "$want" > "$stamp"
fi

# bcc's bindings are pure Python over libbcc (ctypes): link the Debian package into the venv.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_src=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null) \
  || die "Debian's python3-bpfcc is not importable by /usr/bin/python3; apt-get install python3-bpfcc"
ln -sfn "$bcc_src" "$site/bcc"
"$venv/bin/python" -c 'import bcc' || die "import bcc fails inside .venv"

ln -sfn "$venv/bin/nodeagent" /usr/local/bin/nodeagent
log "ready ($("$venv/bin/python" --version), bcc from $bcc_src, nodeagent -> /usr/local/bin/nodeagent)"
