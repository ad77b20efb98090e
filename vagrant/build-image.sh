#!/usr/bin/env bash
# Build the nodeagent image without docker and import it into k3s's containerd.
#   buildah (Debian package) builds daemonset/Dockerfile; `buildah push` writes a docker-archive that
#   `k3s ctr images import` loads; pods use it with imagePullPolicy IfNotPresent (nodeagent:dev).
set -euo pipefail
src=${1:-/nodeagent}
archive=/var/tmp/nodeagent-image.tar
cd "$src"
buildah bud --quiet --layers -t localhost/nodeagent:dev -f daemonset/Dockerfile .
rm -f "$archive"
buildah push --quiet localhost/nodeagent:dev "docker-archive:$archive:docker.io/library/nodeagent:dev"
k3s ctr images import "$archive"
k3s ctr images ls -q | grep 'nodeagent:dev'
