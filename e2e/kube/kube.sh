#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for the operator and webhook e2e tests.
#
#   e2e/kube/kube.sh build    build etcd, kube-apiserver, kube-controller-manager and kubectl
#                             into $STATE/kube/bin (once per Kubernetes version; ~minutes cold)
#   e2e/kube/kube.sh up       build if needed, start the control plane, print `export` lines
#   e2e/kube/kube.sh down     stop what `up` started
#   e2e/kube/kube.sh status   what is running
#
# Use it as:   eval "$(e2e/kube/kube.sh up)"      (then plain `kubectl ...` works)
#
# $STATE is ${SHOTOVER_E2E_DIR:-$HOME/.cache/shotover-e2e}. Progress goes to stderr, the
# export lines to stdout: KUBECONFIG (admin, client certificate CN=admin O=system:masters)
# and PATH (with $STATE/kube/bin first, so kubectl matches the server). `up` is idempotent:
# a healthy control plane is left alone and only the exports are printed. Each fresh start
# begins with an empty etcd (the certificates under $STATE/kube/pki are kept).
#
# What runs (etcd and the controller-manager on 127.0.0.1, the apiserver on the cluster
# address: a /32 on the interface shotover-e2e0 that `up` adds and `down` removes):
#   etcd                     http://127.0.0.1:${KUBE_ETCD_PORT:-12379} (peer port 12380),
#                            data in $STATE/kube/run/etcd, --unsafe-no-fsync
#   kube-apiserver           https://${KUBE_NODE_IP:-10.245.0.1}:${KUBE_APISERVER_PORT:-16443},
#                            authorization Node,RBAC, admission webhooks on, service CIDR
#                            10.0.0.0/24; the `kubernetes` Service's endpoint is that address
#   kube-controller-manager  https://127.0.0.1:${KUBE_CM_PORT:-10257}, no leader election,
#                            controllers: $KUBE_CONTROLLERS (default list below)
# Versions: Kubernetes from e2e/kube/K8S_VERSION, etcd as that release requires (go.mod).
# `build` also builds the node's kubelet, kube-scheduler and kube-proxy (e2e/node/node.sh).
#
# ON ITS OWN THIS CONTROL PLANE HAS NO NODE (`e2e/services up kube-node` adds one):
#   * Pods are created (and go through the admission webhooks, which is what the injector
#     tests need) and the StatefulSet/ReplicaSet controllers create them, but they never
#     run: no node, no IP, phase Pending forever, unless a test says otherwise.
#   * A test makes a Pod Ready by writing its status through the status subresource:
#       kubectl patch pod NAME -n NS --subresource=status --type=merge \
#         -p '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}'
#     The StatefulSet controller then counts it: status.readyReplicas and availableReplicas
#     go up (checked against this control plane for Pods created by a StatefulSet). With
#     OrderedReady (the default) pod N+1 is created only once pod N is Ready, so patch them in
#     turn. The same patch may set "podIP" and "podIPs" (a loopback address is accepted, e.g.
#     where the test runs a real process for that Pod); without containerStatuses kubectl
#     still shows READY 0/1, which nothing else looks at.
#   * Pods are never bound to a node. Keep it so: an unscheduled Pod is deleted at once, while a
#     Pod with spec.nodeName waits for a kubelet that never confirms the deletion, until the
#     pod GC controller removes it about a minute later (measured: ~60 s).
#   * Service ClusterIPs (10.0.0.0/24) are allocated but without the node nothing routes
#     them. Register webhooks with clientConfig.url: https://127.0.0.1:PORT/... plus caBundle
#     (as envtest does). A service reference is resolved to the Service's endpoints
#     (--enable-aggregator-routing), never to the ClusterIP, so it needs Pods that run.
#   * The `default` ServiceAccount of a new namespace is created by the controller-manager
#     a moment after the namespace; the ServiceAccount admission plugin waits ~1-2 s for it, so
#     a Pod can be created right after its namespace (checked).
#   * Namespace deletion and owner-reference garbage collection work (controller-manager).
#   * With the node up, a namespace keeps its Pods off it (Pending, as without a node) with
#     the annotation scheduler.alpha.kubernetes.io/node-selector: shotover.io/e2e=no-node
#     (the PodNodeSelector admission plugin adds that selector to its Pods; no node has the
#     label): the tests written for a node-less control plane do this.
#
# Files here:
#   K8S_VERSION        the Kubernetes release (v1.36.3: the newest the Go module proxy serves
#                      whose `go` line the installed Go satisfies)
#   gen-gomod.sh       writes go.mod from that release's own go.mod (one `replace` per k8s.io
#                      staging module it requires as v0.0.0) and runs `go mod tidy`
#   go.mod, go.sum     generated; `tool` lines name kube-apiserver, kube-controller-manager, kubectl
#   cmd/etcd/main.go   etcd's own main (etcdmain.Main) at the version the release requires
#   smoke.sh           checks this control plane end to end (see there); prints "N passed, N failed"
# To move to another release: put its version in K8S_VERSION, run gen-gomod.sh, commit go.mod
# and go.sum; the next `build` rebuilds (the cache key is the version plus go.mod/go.sum).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SHOTOVER_E2E_DIR:-$HOME/.cache/shotover-e2e}"
KDIR="$STATE/kube"
BIN="$KDIR/bin"
PKI="$KDIR/pki"
RUN="$KDIR/run"
K8S_VERSION="$(tr -d '[:space:]' < "$HERE/K8S_VERSION")"

ETCD_PORT="${KUBE_ETCD_PORT:-12379}"
ETCD_PEER_PORT="${KUBE_ETCD_PEER_PORT:-12380}"
API_PORT="${KUBE_APISERVER_PORT:-16443}"
CM_PORT="${KUBE_CM_PORT:-10257}"
SERVICE_CIDR="10.0.0.0/24"
# The cluster's own address: on an interface this script adds (and removes on `down`), so
# that Pods on the node (e2e/node) reach the apiserver through the `kubernetes` Service
# (kube-proxy cannot send Pod traffic to loopback) and the kubelet has an InternalIP.
NODE_IP="${KUBE_NODE_IP:-10.245.0.1}"
NODE_LINK="shotover-e2e0"
NODE_NETNS="shotover-e2e"
SERVICE_IP="10.0.0.1" # first IP of SERVICE_CIDR: the `kubernetes` Service
DEFAULT_CONTROLLERS="node-lifecycle-controller,serviceaccount-token-controller,serviceaccount-controller,namespace-controller,garbage-collector-controller,statefulset-controller,replicaset-controller,deployment-controller,endpoints-controller,endpointslice-controller,root-ca-certificate-publisher-controller,disruption-controller,pod-garbage-collector-controller,clusterrole-aggregation-controller"
CONTROLLERS="${KUBE_CONTROLLERS:-$DEFAULT_CONTROLLERS}"
ADMIN_KUBECONFIG="$KDIR/admin.kubeconfig"

log() { echo "e2e/kube: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
  log "$what is up"
}

# ---------------------------------------------------------------------------------- build

build_key() {
  # The Kubernetes version plus the exact module graph and our etcd main.
  echo "k8s=$K8S_VERSION $(cd "$HERE" && cat go.mod go.sum cmd/etcd/main.go | sha256sum | cut -c1-16)"
}

built() {
  [ -f "$BIN/.built" ] && [ "$(cat "$BIN/.built")" = "$(build_key)" ] || return 1
  local b; for b in etcd kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy; do [ -x "$BIN/$b" ] || return 1; done
}

cmd_build() {
  if built; then log "binaries for $K8S_VERSION already built in $BIN"; return 0; fi
  command -v go >/dev/null || die "go is not installed (need the version in $HERE/go.mod)"
  local start; start=$(now)
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local pkgs ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
        k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler
        k8s.io/kubernetes/cmd/kube-proxy ./cmd/etcd)
  mkdir -p "$KDIR"
  local tmp; tmp="$(mktemp -d "$KDIR/bin.tmp.XXXXXX")"; chmod 755 "$tmp"
  log "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kubectl, and the node's kubelet, kube-scheduler, kube-proxy) and etcd"
  log "  with $(go version | cut -d' ' -f3); modules in $(go env GOMODCACHE), build cache in $(go env GOCACHE)"
  (cd "$HERE" && CGO_ENABLED=0 nice -n 10 go build -mod=readonly -buildvcs=false -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}") \
    || { rm -rf "$tmp"; die "go build failed"; }
  build_key > "$tmp/.built"
  rm -rf "$BIN"
  mv "$tmp" "$BIN"
  log "built in $(since "$start") s: $(cd "$BIN" && du -sh . | cut -f1) in $BIN"
}

# ---------------------------------------------------------------------------------- certs

gen_key() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }

# gen_cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA, valid 10 years.
gen_cert() {
  local name=$1 subj=$2 ext=$3
  gen_key "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

ensure_pki() {
  command -v openssl >/dev/null || die "openssl is not installed"
  local f complete=yes
  for f in ca.crt apiserver.crt admin.crt controller-manager.crt kubelet-client.crt front-proxy-ca.crt front-proxy-client.crt sa.key sa.pub .complete; do
    [ -f "$PKI/$f" ] || complete=
  done
  # Made for another cluster address: make them again.
  [ "$(cat "$PKI/.complete" 2>/dev/null)" = "$NODE_IP" ] || complete=
  [ -n "$complete" ] && return 0
  log "making a CA, serving and client certificates and a service-account key in $PKI"
  rm -rf "$PKI"; mkdir -p "$PKI"; chmod 700 "$PKI"
  gen_key "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=shotover-e2e-kube-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/ca.crt" 2>/dev/null
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  gen_cert apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  gen_cert admin "/O=system:masters/CN=admin" "$client"
  # The apiserver's identity towards kubelets (logs, exec, port-forward).
  gen_cert kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  # The request-header (front-proxy) CA the apiserver announces in
  # kube-system/extension-apiserver-authentication; delegating servers (the controller-manager,
  # aggregated API servers) read it from there.
  gen_key "$PKI/front-proxy-ca.key"
  openssl req -x509 -new -key "$PKI/front-proxy-ca.key" -subj "/CN=shotover-e2e-front-proxy-ca" -days 3650 \
    -sha256 -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/front-proxy-ca.crt" 2>/dev/null
  gen_key "$PKI/front-proxy-client.key"
  openssl req -new -key "$PKI/front-proxy-client.key" -subj "/CN=front-proxy-client" -out "$PKI/fp.csr" 2>/dev/null
  printf '%s\n' "$client" > "$PKI/fp.ext"
  openssl x509 -req -in "$PKI/fp.csr" -CA "$PKI/front-proxy-ca.crt" -CAkey "$PKI/front-proxy-ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI/fp.ext" -out "$PKI/front-proxy-client.crt" 2>/dev/null
  rm -f "$PKI/fp.csr" "$PKI/fp.ext"
  gen_cert controller-manager "/CN=system:kube-controller-manager" "$client"
  gen_key "$PKI/sa.key"
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  echo "$NODE_IP" > "$PKI/.complete"
}

# write_kubeconfig FILE USER: a kubeconfig for the apiserver with USER's client certificate.
write_kubeconfig() {
  local file=$1 user=$2
  cat > "$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shotover-e2e
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$user.crt")
    client-key-data: $(base64 -w0 < "$PKI/$user.key")
contexts:
- name: shotover-e2e
  context:
    cluster: shotover-e2e
    user: $user
    namespace: default
current-context: shotover-e2e
EOF
  chmod 600 "$file.tmp"
  mv "$file.tmp" "$file"
}

# ---------------------------------------------------------------------------------- processes

# Our process behind a pid file: alive and running one of our binaries (guards pid reuse).
pid_ours() {
  local pidfile=$1 pid exe
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ "$exe" == "$BIN/"* ]]
}

# start NAME BINARY ARGS...: runs detached (own session), log in $RUN/NAME.log, pid in $RUN/NAME.pid.
start() {
  local name=$1 bin=$2; shift 2
  setsid "$BIN/$bin" "$@" </dev/null >"$RUN/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$RUN/$name.pid"
  # Until setsid has exec'd the binary, /proc/PID/exe is bash or setsid, and pid_ours would
  # take the starting process for a dead one: wait (at most 5 s) for the exec or the exit.
  local i
  for i in $(seq 1 250); do
    pid_ours "$RUN/$name.pid" && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.02
  done
}

# A process that died while we wait for it: fail at once with the end of its log.
alive_or_die() {
  pid_ours "$RUN/$1.pid" && return 0
  tail -n 20 "$RUN/$1.log" >&2 || true
  die "$1 exited during start-up, see $RUN/$1.log"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kubectl_admin() { "$BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout=5s "$@"; }

etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() { [ "$(kubectl_admin get --raw /readyz 2>/dev/null)" = ok ]; }
cm_healthy() { [ "$(curl -sk --max-time 2 "https://127.0.0.1:$CM_PORT/healthz")" = ok ]; }
default_sa_exists() { kubectl_admin get serviceaccount default -n default -o name >/dev/null 2>&1; }

# wait_alive SECONDS NAME DESCRIPTION CHECK...: wait_for, failing early if NAME's process died.
wait_alive() {
  local secs=$1 name=$2 what=$3; shift 3
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    alive_or_die "$name"
    [ "$(date +%s)" -lt "$deadline" ] || { tail -n 20 "$RUN/$name.log" >&2; die "$what not ready within $secs s, see $RUN/$name.log"; }
    sleep 0.2
  done
  log "$what is up"
}

link_up() { ip -br addr show dev "$NODE_LINK" 2>/dev/null | grep -q "$NODE_IP/32"; }

# The cluster address on its own interface: one end of a veth pair whose other end lives in
# a network namespace of its own (this kernel has no dummy interfaces); nothing is routed
# through it, the address is simply local to this machine.
ensure_link() {
  link_up && return 0
  command -v ip >/dev/null || die "the ip command (Debian iproute2) is missing"
  ip -br addr | grep -q " $NODE_IP/" && die "$NODE_IP is already used by another interface (set KUBE_NODE_IP)"
  remove_link quiet
  ip netns add "$NODE_NETNS" || die "cannot add the network namespace $NODE_NETNS (needs root and CAP_SYS_ADMIN)"
  ip link add "$NODE_LINK" type veth peer name "${NODE_LINK%0}1" \
    || die "cannot add the veth pair $NODE_LINK (needs root and CAP_NET_ADMIN)"
  ip link set "${NODE_LINK%0}1" netns "$NODE_NETNS" || die "cannot move ${NODE_LINK%0}1 into $NODE_NETNS"
  ip -n "$NODE_NETNS" link set "${NODE_LINK%0}1" up || die "cannot bring ${NODE_LINK%0}1 up"
  ip addr add "$NODE_IP/32" dev "$NODE_LINK" || die "cannot add $NODE_IP to $NODE_LINK"
  ip link set "$NODE_LINK" up || die "cannot bring $NODE_LINK up"
  log "cluster address $NODE_IP on $NODE_LINK"
}

remove_link() {
  if ip link show "$NODE_LINK" >/dev/null 2>&1; then
    ip link delete "$NODE_LINK" && { [ -n "${1:-}" ] || log "removed $NODE_LINK ($NODE_IP)"; }
  fi
  if [ -e "/run/netns/$NODE_NETNS" ]; then ip netns delete "$NODE_NETNS" || true; fi
}

healthy() {
  link_up && pid_ours "$RUN/etcd.pid" && pid_ours "$RUN/kube-apiserver.pid" && pid_ours "$RUN/kube-controller-manager.pid" \
    && [ -f "$ADMIN_KUBECONFIG" ] && apiserver_ready && cm_healthy && default_sa_exists
}

print_exports() {
  echo "export KUBECONFIG=$ADMIN_KUBECONFIG"
  case ":$PATH:" in
    "$BIN:"*) ;;   # already first
    *) echo "export PATH=$BIN:\$PATH" ;;
  esac
}

cmd_up() {
  cmd_build
  if healthy; then
    log "control plane already up on https://$NODE_IP:$API_PORT"
    print_exports
    return 0
  fi
  local start; start=$(now)
  stop_all quiet
  ensure_pki
  local p; for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$CM_PORT"; do
    port_in_use "$p" && die "127.0.0.1:$p is in use by another process (set KUBE_*_PORT, see kube.sh)"
  done
  ensure_link
  (exec 3<>"/dev/tcp/$NODE_IP/$API_PORT") 2>/dev/null && die "$NODE_IP:$API_PORT is in use by another process"
  rm -rf "$RUN"; mkdir -p "$RUN/etcd" "$RUN/cm-certs"; chmod 700 "$RUN/etcd"
  write_kubeconfig "$ADMIN_KUBECONFIG" admin
  write_kubeconfig "$RUN/controller-manager.kubeconfig" controller-manager

  start etcd etcd --name=e2e --data-dir="$RUN/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="e2e=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new \
    --unsafe-no-fsync --log-level=warn --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
  wait_alive 30 etcd "etcd on 127.0.0.1:$ETCD_PORT" etcd_healthy

  start kube-apiserver kube-apiserver \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
    --cert-dir="$RUN" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,PodNodeSelector \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --enable-aggregator-routing=true \
    --kubelet-client-certificate="$PKI/kubelet-client.crt" --kubelet-client-key="$PKI/kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --allow-privileged=true \
    --profiling=false
  wait_alive 60 kube-apiserver "kube-apiserver on https://$NODE_IP:$API_PORT (/readyz)" apiserver_ready

  start kube-controller-manager kube-controller-manager \
    --kubeconfig="$RUN/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$RUN/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$RUN/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$CM_PORT" --cert-dir="$RUN/cm-certs" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --controllers="$CONTROLLERS" \
    --profiling=false
  wait_alive 30 kube-controller-manager "kube-controller-manager on https://127.0.0.1:$CM_PORT (/healthz)" cm_healthy
  wait_alive 30 kube-controller-manager "the default ServiceAccount in namespace default" default_sa_exists

  log "control plane $K8S_VERSION up on https://$NODE_IP:$API_PORT in $(since "$start") s (logs in $RUN)"
  print_exports
}

# stop NAME...: SIGTERM to each of them at once, then wait up to 10 s for each, then SIGKILL.
stop() {
  local name pids=() names=()
  for name in "$@"; do
    if pid_ours "$RUN/$name.pid"; then
      pids+=("$(cat "$RUN/$name.pid")"); names+=("$name")
      kill "${pids[-1]}" 2>/dev/null || true
    fi
  done
  local i
  for i in "${!pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      log "${names[$i]} did not stop within 10 s: SIGKILL"
      kill -9 "${pids[$i]}" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
    fi
    [ -n "$QUIET_STOP" ] || log "stopped ${names[$i]}"
  done
  for name in "$@"; do rm -f "$RUN/$name.pid"; done
}

QUIET_STOP=
stop_all() {
  QUIET_STOP="${1:-}"
  # The apiserver and the controller-manager together, etcd once the apiserver is gone.
  stop kube-controller-manager kube-apiserver
  stop etcd
  [ -n "$QUIET_STOP" ] || remove_link
}

cmd_status() {
  local n
  for n in etcd kube-apiserver kube-controller-manager; do
    if pid_ours "$RUN/$n.pid"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; else echo "$n: stopped"; fi
  done
  if built; then echo "binaries: $K8S_VERSION in $BIN"; else echo "binaries: not built"; fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  build) cmd_build ;;
  up) cmd_up ;;
  down) stop_all ;;
  status) cmd_status ;;
  *) die "usage: e2e/kube/kube.sh build|up|down|status" ;;
esac
