#!/usr/bin/env bash
# A small multi-service app in namespace `demo`: web (HTTP 8080) and api (HTTP 9090) servers, a client;
# then `nodeagent enroll demo` (the CLI from the host's checkout, via the k3s kubeconfig).
set -euo pipefail
src=${1:-/nodeagent}
kubectl() { k3s kubectl "$@"; }
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: docker.io/library/busybox:1.36
          command: ["sh", "-c", "mkdir -p /www && echo nodeagent-e2e-marker-web > /www/index.html && httpd -f -p 8080 -h /www"]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      serviceAccountName: api
      containers:
        - name: api
          image: docker.io/library/busybox:1.36
          command: ["sh", "-c", "mkdir -p /www && echo nodeagent-e2e-marker-api > /www/index.html && httpd -f -p 9090 -h /www"]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers:
        - name: client
          image: docker.io/library/busybox:1.36
          command: ["sleep", "infinity"]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  selector: {app: api}
  ports: [{port: 90, targetPort: 9090}]
YAML
kubectl -n demo rollout status deployment/web deployment/api deployment/client --timeout=180s 2>/dev/null \
  || for d in web api client; do kubectl -n demo rollout status "deployment/$d" --timeout=180s; done
# Enroll with the image's CLI (kubectl habits: --kubeconfig), printing which pods join.
k3s ctr run --rm --net-host --mount "type=bind,src=/etc/rancher/k3s/k3s.yaml,dst=/kubeconfig,options=rbind:ro" \
  docker.io/library/nodeagent:dev enroll-demo nodeagent enroll demo --kubeconfig /kubeconfig
echo "sample app deployed from $src and enrolled"
