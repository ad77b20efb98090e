#!/usr/bin/env bash
# The real checks, inside the VM: enrolled pods reach each other; servers report mutual_tls; on the wire
# between pods only TLS to port 15008 (no plaintext marker); every enrolled pod is annotated enabled and
# has nodeagent's capture rules in its own netns (read with nsenter + iptables-save: an independent oracle);
# `nodeagent inspect redirects --node` through the API server lists every demo pod.
set -euo pipefail
kubectl() { k3s kubectl "$@"; }
fail() { echo "E2E FAIL: $*" >&2; exit 1; }
start=$(date +%s)

client=$(kubectl -n demo get pod -l app=client -o jsonpath='{.items[0].metadata.name}')
pods=$(kubectl -n demo get pods -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.podIP}{"\n"}{end}')

echo "== 1. every enrolled pod is annotated and captured"
for _ in $(seq 1 60); do
  pending=$(kubectl -n demo get pods -o json \
    | jq -r '.items[] | select(.metadata.annotations["ambient.istio.io/redirection"] != "enabled") | .metadata.name')
  [ -z "$pending" ] && break
  sleep 2
done
[ -z "$pending" ] || fail "pods without ambient.istio.io/redirection=enabled: $pending"
while read -r name ip; do
  [ -n "$name" ] || continue
  sandbox=$(k3s crictl pods --namespace demo --name "$name" -q | head -n 1)
  netns=$(k3s crictl inspectp "$sandbox" \
    | jq -r '.info.runtimeSpec.linux.namespaces[] | select(.type == "network") | .path')
  if [ -z "$netns" ] || [ ! -e "$netns" ]; then fail "no netns found for $name ($ip)"; fi
  nsenter --net="$netns" iptables-save 2>/dev/null | grep -qi nodeagent || fail "$name: no nodeagent rules in its netns"
  echo "  $name $ip: enabled, rules present in $netns"
done <<< "$pods"

echo "== 2. pods reach each other (through the tunnel)"
capture=/var/tmp/e2e.pcap
tcpdump -i any -nn -s 256 -w "$capture" 'tcp and net 10.42.0.0/16' >/dev/null 2>&1 &
dump=$!
sleep 1
for target in web.demo:80 api.demo:90; do
  for _ in 1 2 3; do
    kubectl -n demo exec "$client" -- wget -qO- -T 5 "http://$target/" | grep -q nodeagent-e2e-marker \
      || fail "client -> $target failed"
  done
done
web=$(kubectl -n demo get pod -l app=web -o jsonpath='{.items[0].metadata.name}')
kubectl -n demo exec "$web" -- wget -qO- -T 5 http://api.demo:90/ | grep -q nodeagent-e2e-marker-api || fail "web -> api failed"
sleep 1
kill "$dump"; wait "$dump" 2>/dev/null || true

echo "== 3. on the wire: only TLS to 15008 between pods, no plaintext"
plain=$(tcpdump -nn -r "$capture" 'tcp and not port 15008 and not port 15001 and not port 15006 and (tcp[tcpflags] & tcp-push != 0)' 2>/dev/null \
  | grep -v ' lo ' | grep -c 'IP 10\.42\..* > 10\.42\.' || true)
[ "$plain" -eq 0 ] || fail "$plain data packets between pods outside port 15008"
tcpdump -nn -r "$capture" 'tcp port 15008' 2>/dev/null | grep -q . || fail "no HBONE (15008) traffic seen"
if tcpdump -nn -A -r "$capture" 'tcp port 15008' 2>/dev/null | grep -q nodeagent-e2e-marker; then
  fail "the app's marker crossed port 15008 in plaintext"
fi

echo "== 4. the servers' tunnel reports mutual_tls"
metrics=$(curl -sf "http://127.0.0.1:15020/metrics") || fail "no metrics on :15020"
echo "$metrics" | grep 'istio_tcp_connections_opened_total{' | grep 'reporter="destination"' \
  | grep -q 'connection_security_policy="mutual_tls"' || fail "no destination-reported mutual_tls connections"

echo "== 5. nodeagent inspect redirects, through the API server (pods/portforward), lists every demo pod"
node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
report=$(k3s ctr run --rm --net-host --mount "type=bind,src=/etc/rancher/k3s/k3s.yaml,dst=/kubeconfig,options=rbind:ro" \
  docker.io/library/nodeagent:dev inspect-e2e-$$ \
  nodeagent inspect redirects --node "$node" --kubeconfig /kubeconfig -n demo --verify -o json) \
  || fail "nodeagent inspect redirects --node $node failed"
while read -r name ip; do
  [ -n "$name" ] || continue
  echo "$report" | jq -e --arg pod "$name" '.rows[] | select(.pod == $pod and .status == "enabled")' >/dev/null \
    || fail "inspect redirects does not list $name as enabled"
done <<< "$pods"
echo "  inspect redirects lists all $(echo "$report" | jq '.rows | length') demo pods"

echo "E2E PASS in $(( $(date +%s) - start )) s"
