#!/usr/bin/env bash
# The release gate: mailrelay on a real Kubernetes cluster (kind), the way the README
# tells a new user to install it. The release workflow runs it before anything is
# published; run it yourself with docker, kind, kubectl, helm, swaks, curl and cargo
# on PATH (nothing here runs on the project's CI machines: they have no container
# engine).
#
#   hack/kind-e2e.sh                        # builds, tests, deletes the cluster
#   KEEP_CLUSTER=1 hack/kind-e2e.sh         # leaves the cluster for a look around
#   KIND_NODE_IMAGE=kindest/node:v1.31.4 hack/kind-e2e.sh   # a given Kubernetes
#
# Steps: build both images and the plugin; create a cluster; install the chart with
# the bundled Redis into a namespace that enforces Pod Security "restricted", then
# add a first relay with `helm upgrade` (as the README does); wait for Ready;
# send mail through `kubectl port-forward` (the README's quickstart) and
# from a pod; see it arrive at an in-cluster sink (Mailpit) and read it with
# `kubectl mailrelay`; upgrade the chart; restart the relays under load and check
# that no connection was refused and nothing accepted was lost; uninstall.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-mailrelay-e2e}
NS=mail
SINK_NS=mail-sink
TAG=e2e
PREFIX=mailrelay-e2e.local
RELAY_IMAGE=$PREFIX/mailrelay
OPERATOR_IMAGE=$PREFIX/mailrelay-operator
LOAD=${LOAD:-300}
work=$(mktemp -d)

step() { printf '\n=== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
cleanup() {
  local rc=$?
  jobs -p | xargs -r kill 2>/dev/null || true
  if [ $rc -ne 0 ]; then
    kubectl -n "$NS" get all,mailrelays,sendquotas -o wide 2>/dev/null || true
    kubectl -n "$NS" logs -l app.kubernetes.io/name=mailrelay --tail=50 --prefix 2>/dev/null || true
  fi
  [ -n "${KEEP_CLUSTER:-}" ] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Counts the messages Mailpit holds (its HTTP API, through a port-forward).
sink_count() { curl -fsS http://127.0.0.1:18025/api/v1/messages?limit=1 | sed -n 's/.*"total":\([0-9]*\).*/\1/p'; }
wait_sink() {
  local want=$1 n
  for _ in $(seq 120); do
    n=$(sink_count || echo 0)
    [ "${n:-0}" -ge "$want" ] && return 0
    sleep 2
  done
  fail "the sink has ${n:-0} messages, expected at least $want"
}

step "build images and the plugin"
docker build --target mailrelay -t "$RELAY_IMAGE:$TAG" .
docker build --target mailrelay-operator -t "$OPERATOR_IMAGE:$TAG" .
cargo build --release --locked -p mailrelay-operator --bin kubectl-mailrelay
export PATH="$PWD/target/release:$PATH"

step "cluster"
kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 2m
kind load docker-image --name "$CLUSTER" "$RELAY_IMAGE:$TAG" "$OPERATOR_IMAGE:$TAG"
kubectl create namespace "$NS"
kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest

step "a sink for delivered mail (Mailpit, outside the restricted namespace)"
kubectl create namespace "$SINK_NS"
kubectl -n "$SINK_NS" create deployment mailpit --image=axllent/mailpit:v1.21 --port=1025
kubectl -n "$SINK_NS" expose deployment mailpit --name=mailpit --port=1025,8025
kubectl -n "$SINK_NS" rollout status deployment/mailpit --timeout=3m
kubectl -n "$SINK_NS" port-forward service/mailpit 18025:8025 >/dev/null 2>&1 &

step "helm install: CRDs, operator, bundled Redis (the README's first step)"
# kubectl mailrelay reaches the admin port through the API server, admitted by
# address (docs/operations.md, "Network exposure").
apiserver=$(kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes \
  -o jsonpath='{.items[0].endpoints[0].addresses[0]}')
helm install mailrelay charts/mailrelay-operator -n "$NS" --wait --timeout 5m \
  --set "networkPolicy.apiServerCIDRs={$apiserver/32}" \
  --set image.repository="$OPERATOR_IMAGE",image.tag="$TAG" \
  --set relayImage.repository="$RELAY_IMAGE",relayImage.tag="$TAG" \
  --set redis.enabled=true,redis.auth.generatePassword=true

step "helm upgrade: a first relay delivering to the sink (the README's second step)"
helm upgrade mailrelay charts/mailrelay-operator -n "$NS" --reuse-values --wait --timeout 5m \
  --set relay.enabled=true,relay.name=outbound,relay.hostname=relay.e2e.test \
  --set 'relay.relayNetworks={10.0.0.0/8}' \
  --set relay.delivery.smarthost.host="mailpit.$SINK_NS.svc.cluster.local" \
  --set relay.delivery.smarthost.port=1025,relay.delivery.smarthost.tls=disabled \
  --set-json "relay.networkPolicy={\"smtpFrom\": [{\"podSelector\": {}}, {\"namespaceSelector\": {\"matchLabels\": {\"kubernetes.io/metadata.name\": \"$SINK_NS\"}}}]}"
kubectl -n "$NS" wait mailrelay/outbound --for=condition=Ready --timeout=5m
kubectl get sendquotas,mailrelays -A

step "mail through port-forward (the README's quickstart)"
kubectl -n "$NS" port-forward service/outbound 12525:2525 >/dev/null 2>&1 &
for _ in $(seq 30); do nc -z 127.0.0.1 12525 2>/dev/null && break; sleep 1; done
swaks --server 127.0.0.1:12525 --from quickstart@e2e.test --to you@example.net \
  --header "Subject: quickstart" | tee "$work/swaks.txt"
grep -q '^<-  250 2.0.0' "$work/swaks.txt" || fail "the quickstart mail was not accepted"

step "mail from a pod"
kubectl -n "$SINK_NS" run smtp-client --image=python:3.12-alpine --restart=Never --rm -i -- \
  python -c "import smtplib; s = smtplib.SMTP('outbound.$NS.svc.cluster.local', 2525, timeout=30); \
print(s.sendmail('pod@e2e.test', ['you@example.net'], 'Subject: from a pod\r\n\r\nhi\r\n')); s.quit()"
wait_sink 2

step "network policies: an outsider namespace reaches neither SMTP nor Redis"
# kindnetd enforces NetworkPolicy from kind v0.24.0 on (with the nft_queue
# kernel module); older kinds accept the policies and enforce nothing.
kind_minor=$(kind version | sed -n 's/^kind v0\.\([0-9]*\)\..*/\1/p')
if [ "${kind_minor:-0}" -ge 24 ]; then
  kubectl create namespace e2e-outsider
  for target in "outbound.$NS.svc.cluster.local:2525" "mailrelay-mailrelay-operator-redis.$NS.svc.cluster.local:6379"; do
    if kubectl -n e2e-outsider run probe --image=busybox:1.36 --restart=Never --rm -i -- \
      nc -z -w 5 "${target%:*}" "${target##*:}"; then
      fail "a pod in e2e-outsider reached $target through the NetworkPolicies"
    fi
  done
  kubectl get networkpolicies -n "$NS"
else
  echo "kind $(kind version): no NetworkPolicy enforcement, check skipped"
fi

step "kubectl mailrelay"
kubectl mailrelay -n "$NS" status outbound
kubectl mailrelay -n "$NS" queue outbound
kubectl mailrelay -n "$NS" quota

step "SenderDomain: a generated key reaches the relay pods without a restart"
# Only a cluster proves the kubelet's refresh of the mounted bundle Secret.
# No public DNS here: DNS checks off, so the key signs at once.
pods_before=$(kubectl -n "$NS" get pods -l app.kubernetes.io/instance=outbound -o name | sort)
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: mailrelay.io/v1alpha1
kind: SenderDomain
metadata: {name: e2e}
spec:
  domain: e2e.test
  dnsCheck: {enabled: false}
  keys: [{selector: e2e, algorithm: ed25519-sha256}]
YAML
kubectl -n "$NS" wait senderdomain/e2e --for=condition=KeysReady --timeout=2m
kubectl -n "$NS" get senderdomains
pod=$(kubectl -n "$NS" get pods -l app.kubernetes.io/instance=outbound -o name | head -1)
for _ in $(seq 1 60); do
  kubectl -n "$NS" exec "$pod" -- cat /var/run/mailrelay/dkim/keys.yaml 2>/dev/null | grep -q 'selector: e2e' && break
  sleep 3
done
kubectl -n "$NS" exec "$pod" -- cat /var/run/mailrelay/dkim/keys.yaml | grep -q 'selector: e2e' ||
  fail "the key never reached the mounted bundle"
[ "$(kubectl -n "$NS" get pods -l app.kubernetes.io/instance=outbound -o name | sort)" = "$pods_before" ] ||
  fail "a key change restarted relay pods"

step "helm upgrade"
helm upgrade mailrelay charts/mailrelay-operator -n "$NS" --reuse-values --set relay.replicas=3 --wait --timeout 5m
kubectl -n "$NS" wait mailrelay/outbound --for=condition=Ready --timeout=5m
kubectl -n "$NS" rollout status deployment/outbound --timeout=5m

step "roll the relays under load ($LOAD messages from a pod)"
before=$(sink_count)
kubectl -n "$SINK_NS" run smtp-load --image=python:3.12-alpine --restart=Never -- python -c "
import smtplib, time
ok = refused = 0
for i in range($LOAD):
    try:
        s = smtplib.SMTP('outbound.$NS.svc.cluster.local', 2525, timeout=30)
        s.sendmail('load@e2e.test', ['you@example.net'], 'Subject: load %d\r\n\r\nx\r\n' % i)
        s.quit(); ok += 1
    except (ConnectionRefusedError, smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError) as e:
        refused += 1; print('refused', i, e)
    except smtplib.SMTPResponseException as e:
        print('tempfail', i, e.smtp_code, e.smtp_error)
    time.sleep(0.05)
print('accepted', ok, 'refused', refused)
"
kubectl -n "$SINK_NS" wait pod/smtp-load --for=condition=Ready --timeout=2m
kubectl -n "$NS" rollout restart deployment/outbound
kubectl -n "$NS" rollout status deployment/outbound --timeout=5m
kubectl -n "$SINK_NS" wait pod/smtp-load --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m
kubectl -n "$SINK_NS" logs smtp-load | tee "$work/load.txt"
accepted=$(sed -n 's/^accepted \([0-9]*\) refused \([0-9]*\)$/\1/p' "$work/load.txt")
refused=$(sed -n 's/^accepted \([0-9]*\) refused \([0-9]*\)$/\2/p' "$work/load.txt")
[ "$refused" = 0 ] || fail "$refused connections were refused or cut during the rollout"
wait_sink $((before + accepted))

step "uninstall"
helm uninstall mailrelay -n "$NS" --wait --timeout 5m
kubectl get crd mailrelays.mailrelay.io sendquotas.mailrelay.io >/dev/null ||
  fail "the CRDs were removed by helm uninstall (they carry helm.sh/resource-policy: keep)"
echo "PASS"
