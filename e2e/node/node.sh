#!/usr/bin/env bash
# A real Kubernetes node for the local control plane (e2e/kube/kube.sh): Pods really run.
#
#   e2e/node/node.sh build          install containerd, runc, CNI plugins (Debian), build the
#                                   node binaries (kube.sh build), CoreDNS, the pause image and
#                                   the test image
#   e2e/node/node.sh up             build if needed, start the control plane (kube.sh up) and
#                                   the node, print `export` lines
#   e2e/node/node.sh load FILE...   import OCI image archives into the node's containerd
#   e2e/node/node.sh down           stop everything `up` started, undo what it changed
#   e2e/node/node.sh status         what is running
#
# What runs (all from $STATE/kube/bin or Debian, state under $STATE/node):
#   containerd 1.6 + runc   private root, state and socket ($STATE/node/run/containerd.sock);
#                           SystemdCgroup=false, restrict_oom_score_adj (runc cannot lower
#                           oom_score_adj here), sandbox image: the pause image built here
#   CNI                     bridge shotover-br0 (10.244.0.1/24, Pods in 10.244.0.0/24,
#                           host-local IPAM in a private directory); no masquerading
#   kubelet                 node `shotover-e2e-node`, InternalIP = the control plane's cluster
#                           address (10.245.0.1 on shotover-e2e0), so `kubectl logs/exec` work;
#                           cgroupfs on cgroup v1 (failCgroupV1: false), no eviction, no image
#                           GC, clusterDNS on the cluster address, no host resolv.conf in Pods
#   kube-scheduler          127.0.0.1:10259
#   kube-proxy              iptables mode: Service IPs (10.0.0.0/24) route to Pods and to the
#                           apiserver (`kubernetes` Service); NodePorts only on 10.245.0.1
#   CoreDNS                 10.245.0.1:53, cluster.local from the apiserver, nothing forwarded
# Pod traffic stays on this node: a filter chain (SHOTOVER-E2E-NODE) drops whatever a Pod
# sends that would leave the bridge, other than to the cluster address and the bridge itself.
#
# Images: no registry (containerd's pulls go to a closed loopback port). `up` imports registry.k8s.io/pause:3.10 and localhost/shotover-e2e/tools:1
# (busybox, redis-server and redis-cli from Debian); `load` imports more (the project's images
# from images/build). Use imagePullPolicy: Never or IfNotPresent.
#
# `down` stops every process by pid (kubelet, kube-proxy, scheduler, CoreDNS, every container,
# the shims, containerd), removes kube-proxy's and the guard's iptables rules, unmounts what
# the kubelet and containerd mounted, removes the Pods' network namespaces and the bridge,
# the kubepods cgroups, and restores the two sysctls `up` set (ip_forward,
# bridge-nf-call-iptables). Built binaries and images stay cached.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
KUBE="$ROOT/e2e/kube/kube.sh"
STATE="${SHOTOVER_E2E_DIR:-$HOME/.cache/shotover-e2e}"
KDIR="$STATE/kube"
KBIN="$KDIR/bin"
KPKI="$KDIR/pki"
NDIR="$STATE/node"
NBIN="$NDIR/bin"
IMAGES="$NDIR/images"
RUN="$NDIR/run"
SOCK="$RUN/containerd.sock"
K8S_VERSION="$(tr -d '[:space:]' < "$ROOT/e2e/kube/K8S_VERSION")"

NODE_NAME=shotover-e2e-node
NODE_IP="${KUBE_NODE_IP:-10.245.0.1}"
API_PORT="${KUBE_APISERVER_PORT:-16443}"
POD_CIDR=10.244.0.0/24
BRIDGE=shotover-br0
BRIDGE_IP=10.244.0.1
GUARD=SHOTOVER-E2E-NODE
PAUSE_IMAGE=registry.k8s.io/pause:3.10
TOOLS_IMAGE=localhost/shotover-e2e/tools:1
PROCS=(coredns kube-proxy kube-scheduler kubelet)

log() { echo "e2e/node: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} from Debian"
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

kubectl_admin() { "$KBIN/kubectl" --kubeconfig "$KDIR/admin.kubeconfig" --request-timeout=10s "$@"; }
ctr_() { ctr --address "$SOCK" --namespace k8s.io "$@"; }

# ---------------------------------------------------------------------------------- build

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack busybox-static redis-server redis-tools gcc libc6-dev python3 skopeo podman)

key_of() { cat "$@" | sha256sum | cut -c1-16; }

cmd_build() {
  [ "$(id -u)" = 0 ] || die "the node needs root (containerd, network namespaces, iptables)"
  apt_install "${PACKAGES[@]}"
  "$KUBE" build
  mkdir -p "$NBIN" "$IMAGES"

  local key; key="coredns $(key_of "$HERE/coredns/go.mod" "$HERE/coredns/go.sum" "$HERE/coredns/main.go")"
  if [ ! -x "$NBIN/coredns" ] || [ "$(cat "$NBIN/.coredns" 2>/dev/null)" != "$key" ]; then
    local start; start=$(now)
    log "building CoreDNS ($(sed -n 's/^require github.com\/coredns\/coredns //p' "$HERE/coredns/go.mod")) with the plugins in e2e/node/coredns/main.go"
    (cd "$HERE/coredns" && CGO_ENABLED=0 nice -n 10 go build -mod=readonly -buildvcs=false -trimpath \
      -ldflags "-s -w" -o "$NBIN/coredns.tmp" .) || die "go build of CoreDNS failed"
    mv "$NBIN/coredns.tmp" "$NBIN/coredns"; echo "$key" > "$NBIN/.coredns"
    log "CoreDNS built in $(since "$start") s"
  fi

  # The pause image: the sandbox of every Pod, from the pause.c of the Kubernetes module.
  local src; src="$(cd "$ROOT/e2e/kube" && go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
  [ -f "$src" ] || (cd "$ROOT/e2e/kube" && go mod download k8s.io/kubernetes) || die "cannot download k8s.io/kubernetes@$K8S_VERSION"
  [ -f "$src" ] || die "$src is missing from the module"
  key="pause $(key_of "$src" "$ROOT/images/oci.py")"
  if [ ! -f "$IMAGES/pause.oci.tar" ] || [ "$(cat "$IMAGES/.pause" 2>/dev/null)" != "$key" ]; then
    gcc -static -O2 -DVERSION=3.10 -o "$NBIN/pause" "$src" || die "gcc -static of pause.c failed (Debian libc6-dev)"
    python3 "$ROOT/images/oci.py" --name "$PAUSE_IMAGE" --out "$IMAGES/pause.oci.tar" \
      --bin "$NBIN/pause:/pause" --user 65535:65535 >/dev/null
    echo "$key" > "$IMAGES/.pause"
  fi

  # The test image: a shell and Redis from Debian.
  key="tools 2 $(key_of /bin/busybox /usr/bin/redis-server /usr/bin/redis-cli "$ROOT/images/oci.py")"
  if [ ! -f "$IMAGES/tools.oci.tar" ] || [ "$(cat "$IMAGES/.tools" 2>/dev/null)" != "$key" ]; then
    local links=() applet
    for applet in awk cat cp date echo env expr grep head hostname kill ls mkdir mv nc nslookup ps rm \
        sed seq sh sleep sort tail test timeout touch tr wc wget; do
      links+=(--link "/usr/local/bin/busybox:/bin/$applet")
    done
    python3 "$ROOT/images/oci.py" --name "$TOOLS_IMAGE" --out "$IMAGES/tools.oci.tar" \
      --bin /bin/busybox --bin /usr/bin/redis-server --bin /usr/bin/redis-cli "${links[@]}" \
      --entrypoint '["/bin/sh"]' >/dev/null
    echo "$key" > "$IMAGES/.tools"
  fi
}

# ---------------------------------------------------------------------------------- certs

# gen_cert NAME SUBJECT: a client certificate signed by the control plane's CA.
gen_cert() {
  local name=$1 subj=$2 dir="$NDIR/pki"
  mkdir -p "$dir"; chmod 700 "$dir"
  [ -f "$dir/$name.crt" ] && [ "$dir/$name.crt" -nt "$KPKI/ca.crt" ] && return 0
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/$name.key" 2>/dev/null
  openssl req -new -key "$dir/$name.key" -subj "$subj" -out "$dir/$name.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$KPKI/ca.crt" -CAkey "$KPKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

# kubeconfig NAME: $RUN/NAME.kubeconfig with NAME's certificate.
kubeconfig() {
  local name=$1 dir="$NDIR/pki"
  cat > "$RUN/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shotover-e2e
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $KPKI/ca.crt
users:
- name: $name
  user:
    client-certificate: $dir/$name.crt
    client-key: $dir/$name.key
contexts:
- name: shotover-e2e
  context: {cluster: shotover-e2e, user: $name}
current-context: shotover-e2e
EOF
  chmod 600 "$RUN/$name.kubeconfig"
}

# ---------------------------------------------------------------------------------- processes

pid_of() { [ -f "$RUN/$1.pid" ] && cat "$RUN/$1.pid"; }
# Our process behind a pid file: alive and still the binary we started (guards pid reuse).
pid_ours() {
  local pid exe; pid=$(pid_of "$1") || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [ "$(basename "$exe")" = "$2" ]
}

start() {
  local name=$1 bin=$2; shift 2
  setsid "$bin" "$@" </dev/null >"$RUN/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$RUN/$name.pid"
  # Until setsid has exec'd the binary, /proc/PID/exe is bash or setsid, and pid_ours would
  # take the starting process for a dead one: wait (at most 5 s) for the exec or the exit.
  local i
  for i in $(seq 1 250); do
    pid_ours "$name" "$(basename "$bin")" && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.02
  done
}

alive_or_die() {
  pid_ours "$1" "$2" && return 0
  tail -n 30 "$RUN/$1.log" >&2 || true
  die "$1 exited during start-up, see $RUN/$1.log"
}

# wait_alive SECONDS NAME BINARY DESCRIPTION CHECK...
wait_alive() {
  local secs=$1 name=$2 bin=$3 what=$4; shift 4
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    alive_or_die "$name" "$bin"
    [ "$(date +%s)" -lt "$deadline" ] || { tail -n 30 "$RUN/$name.log" >&2; die "$what not ready within $secs s, see $RUN/$name.log"; }
    sleep 0.2
  done
  log "$what is up"
}

# stop_pid NAME BINARY: SIGTERM, 10 s, SIGKILL.
stop_pid() {
  local name=$1 bin=$2 pid
  pid_ours "$name" "$bin" || { rm -f "$RUN/$name.pid"; return 0; }
  pid=$(pid_of "$name")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$RUN/$name.pid"
  [ -n "$QUIET" ] || log "stopped $name"
}

containerd_up() { [ -S "$SOCK" ] && ctr_ version >/dev/null 2>&1; }
node_ready() {
  [ "$(kubectl_admin get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] \
    && ! kubectl_admin get node "$NODE_NAME" -o jsonpath='{.spec.taints[*].effect}' 2>/dev/null | grep -q NoSchedule
}
scheduler_up() { [ "$(curl -sk --max-time 2 https://127.0.0.1:10259/healthz)" = ok ]; }
proxy_up() { curl -sf --max-time 2 http://127.0.0.1:10256/healthz >/dev/null; }
dns_up() { curl -sf --max-time 2 http://127.0.0.1:10181/ready >/dev/null; }
# A real lookup of the `kubernetes` Service through the cluster DNS.
dns_resolves() {
  python3 - "$NODE_IP" <<'EOF'
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x5e2e, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in "kubernetes.default.svc.cluster.local".split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(q, (sys.argv[1], 53))
r = s.recv(512)
sys.exit(0 if struct.unpack(">H", r[6:8])[0] >= 1 and r[-4:] == socket.inet_aton("10.0.0.1") else 1)
EOF
}

healthy() {
  local p
  pid_ours containerd containerd || return 1
  for p in "${PROCS[@]}"; do pid_ours "$p" "$p" || return 1; done
  node_ready && dns_up
}

print_exports() {
  "$KUBE" up 2>/dev/null
  echo "export KUBE_NODE_NAME=$NODE_NAME"
  echo "export CONTAINERD_ADDRESS=$SOCK"
  echo "export CONTAINERD_NAMESPACE=k8s.io"
  echo "export KUBE_NODE_TOOLS_IMAGE=$TOOLS_IMAGE"
}

# What `up` needs on this machine: fail with its name before anything starts.
preflight() {
  [ "$(id -u)" = 0 ] || die "the node needs root (containerd, network namespaces, iptables)"
  local missing=() c
  for c in containerd containerd-shim-runc-v2 runc ctr iptables iptables-save conntrack ip openssl curl python3; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  for c in bridge host-local loopback; do [ -x "/usr/lib/cni/$c" ] || missing+=("/usr/lib/cni/$c"); done
  for c in kubelet kube-proxy kube-scheduler kubectl; do [ -x "$KBIN/$c" ] || missing+=("$KBIN/$c"); done
  [ -x "$NBIN/coredns" ] || missing+=("$NBIN/coredns")
  [ -f "$IMAGES/pause.oci.tar" ] || missing+=("$IMAGES/pause.oci.tar")
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (e2e/node/node.sh build installs and builds them)"
  for c in cpu cpuacct memory pids devices freezer; do
    grep -qE "cgroup .*[,/]$c[, ]|cgroup2 " /proc/mounts || die "no cgroup hierarchy for '$c' is mounted"
  done
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || die "the kernel has no br_netfilter (net.bridge.bridge-nf-call-iptables)"
  [ -c /dev/kmsg ] || die "/dev/kmsg is missing (the kubelet's OOM watcher reads it)"
  local port; for port in 10248 10250 10256 10249 10259 10181 10054; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "127.0.0.1:$port is in use by another process"; fi
  done
  ip -br addr | grep -q " $BRIDGE_IP/" && ! ip link show "$BRIDGE" >/dev/null 2>&1 \
    && die "$BRIDGE_IP is already used by another interface"
  return 0
}

write_configs() {
  mkdir -p "$RUN" "$NDIR/containerd/root" "$NDIR/containerd/state" "$NDIR/containerd/opt" \
    "$NDIR/cni/net.d" "$NDIR/cni/ipam" "$NDIR/kubelet" "$NDIR/pod-logs"
  cat > "$RUN/containerd.toml" <<EOF
version = 2
root = "$NDIR/containerd/root"
state = "$NDIR/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$NDIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NDIR/cni/net.d"
    max_conf_num = 1
EOF
  cat > "$NDIR/cni/net.d/10-shotover-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "shotover-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$BRIDGE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NDIR/cni/ipam"
      }
    }
  ]
}
EOF
  cat > "$RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $KPKI/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$SOCK
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: ""
podLogsDir: $NDIR/pod-logs
podCIDR: $POD_CIDR
maxPods: 250
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
enforceNodeAllocatable: []
serializeImagePulls: false
rotateCertificates: false
nodeStatusUpdateFrequency: 5s
# Mounted ConfigMaps are refreshed on a Pod's periodic sync (1m by default): 10s keeps the
# hot-reload tests short. Nothing else of the tests depends on it.
syncFrequency: 10s
EOF
  cat > "$RUN/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $RUN/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: $POD_CIDR
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false, masqueradeAll: false}
EOF
  cat > "$RUN/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    ready 127.0.0.1:10181
    health 127.0.0.1:10054
    errors
    cache 5
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $RUN/coredns.kubeconfig shotover-e2e
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
}
EOF
}

# The guard: what a Pod sends may stay on the bridge or go to the cluster address, nothing else.
guard_up() {
  iptables -N "$GUARD" 2>/dev/null || iptables -F "$GUARD"
  iptables -A "$GUARD" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -A "$GUARD" -i "$BRIDGE" -d "$NODE_IP/32" -j RETURN
  iptables -A "$GUARD" -i "$BRIDGE" -d "$BRIDGE_IP/32" -j RETURN
  iptables -A "$GUARD" -i "$BRIDGE" -j DROP
  local chain; for chain in INPUT FORWARD; do
    iptables -C "$chain" -j "$GUARD" 2>/dev/null || iptables -I "$chain" 1 -j "$GUARD"
  done
}

set_sysctls() {
  if [ ! -f "$NDIR/sysctl.before" ]; then
    { echo "net.ipv4.ip_forward=$(sysctl -n net.ipv4.ip_forward)"
      echo "net.bridge.bridge-nf-call-iptables=$(sysctl -n net.bridge.bridge-nf-call-iptables)"; } > "$NDIR/sysctl.before"
  fi
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
}

apply_rbac() {
  kubectl_admin apply --server-side --field-manager=shotover-e2e -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "shotover-e2e:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "shotover-e2e:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "shotover-e2e:coredns"}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: "shotover-e2e:coredns"}
EOF
}

cmd_load() {
  [ $# -gt 0 ] || die "usage: e2e/node/node.sh load FILE..."
  containerd_up || die "the node's containerd is not running (e2e/services up kube-node)"
  local f; for f in "$@"; do
    [ -f "$f" ] || die "$f does not exist"
    ctr_ images import "$f" >&2 || die "ctr images import $f failed"
  done
}

cmd_up() {
  cmd_build
  eval "$("$KUBE" up)"
  if healthy; then
    log "node $NODE_NAME already up"
    print_exports
    return 0
  fi
  preflight
  local start; start=$(now)
  QUIET=1 cmd_down
  # A start that fails half-way leaves nothing behind: no process, mount, rule or bridge.
  trap 'status=$?; if [ $status -ne 0 ]; then log "start-up failed: undoing it"; QUIET=1 cmd_down; fi' EXIT
  mkdir -p "$RUN"
  set_sysctls
  guard_up
  gen_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  gen_cert kube-proxy "/CN=system:kube-proxy"
  gen_cert kube-scheduler "/CN=system:kube-scheduler"
  gen_cert coredns "/CN=shotover-e2e:coredns"
  local k; for k in kubelet kube-proxy kube-scheduler coredns; do kubeconfig "$k"; done
  write_configs
  [ -f "$NDIR/netns.before" ] || ls /run/netns 2>/dev/null > "$NDIR/netns.before" || true

  # No registry is ever contacted: every pull goes to a proxy on a closed loopback port and
  # fails at once (ErrImagePull), without even a DNS lookup of the registry's name. Images
  # come from `load`.
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    start containerd containerd --config "$RUN/containerd.toml"
  wait_alive 30 containerd containerd "containerd on $SOCK" containerd_up
  ctr_ images import "$IMAGES/pause.oci.tar" >/dev/null || die "importing the pause image failed"
  ctr_ images label "$PAUSE_IMAGE" io.cri-containerd.pinned=pinned >/dev/null 2>&1 || true
  ctr_ images import "$IMAGES/tools.oci.tar" >/dev/null || die "importing the test image failed"

  start kubelet "$KBIN/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$RUN/kubelet.kubeconfig" \
    --root-dir="$NDIR/kubelet" --cert-dir="$NDIR/pki/kubelet-serving" --node-ip="$NODE_IP" \
    --hostname-override="$NODE_NAME" --v=1
  start kube-scheduler "$KBIN/kube-scheduler" --kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$RUN/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false
  start kube-proxy "$KBIN/kube-proxy" --config="$RUN/kube-proxy.yaml"
  apply_rbac
  start coredns "$NBIN/coredns" -conf "$RUN/Corefile"

  wait_alive 60 kubelet kubelet "node $NODE_NAME (Ready, no NoSchedule taint)" node_ready
  wait_alive 30 kube-scheduler kube-scheduler "kube-scheduler" scheduler_up
  wait_alive 30 kube-proxy kube-proxy "kube-proxy" proxy_up
  wait_alive 30 coredns coredns "CoreDNS on $NODE_IP:53" dns_up
  wait_alive 30 coredns coredns "kubernetes.default.svc.cluster.local through CoreDNS" dns_resolves
  trap - EXIT
  log "node $NODE_NAME up in $(since "$start") s (logs in $RUN, Pod logs in $NDIR/pod-logs)"
  print_exports
}

# ---------------------------------------------------------------------------------- down

# Every mount under our directories and every network namespace the node made, deepest first.
our_mounts() {
  awk '{print $5}' /proc/self/mountinfo | grep -E "^($NDIR/|/run/netns/cni-|/var/run/netns/cni-)" | sort -r -u || true
}

remove_iptables() {
  command -v iptables-save >/dev/null || return 0
  local bin table line rules chains
  for bin in iptables ip6tables; do
    command -v "$bin" >/dev/null || continue
    for table in filter nat mangle; do
      # Rules that jump to kube-proxy's, the CNI's or the guard's chains, then those chains.
      rules=$("$bin-save" -t "$table" 2>/dev/null | grep -E -- "^-A .*-j (KUBE-|CNI-|$GUARD)" \
        | grep -vE "^-A (KUBE-|CNI-|$GUARD)" || true)
      while read -r line; do
        # shellcheck disable=SC2086
        [ -z "$line" ] || "$bin" -t "$table" ${line/-A/-D} 2>/dev/null || true
      done <<<"$rules"
      chains=$("$bin-save" -t "$table" 2>/dev/null | sed -n "s/^:\(\(KUBE-\|CNI-\|$GUARD\)[^ ]*\) .*/\1/p" || true)
      for line in $chains; do "$bin" -t "$table" -F "$line" 2>/dev/null || true; done
      for line in $chains; do "$bin" -t "$table" -X "$line" 2>/dev/null || true; done
    done
  done
}

QUIET=
cmd_down() {
  local p
  for p in "${PROCS[@]}"; do
    case "$p" in coredns) stop_pid coredns coredns ;; *) stop_pid "$p" "$p" ;; esac
  done
  # Every container (Pods and their sandboxes), then their shims, then containerd.
  if containerd_up; then
    local ids; ids=$(ctr_ tasks ls -q 2>/dev/null || true)
    for p in $ids; do ctr_ tasks kill -s SIGKILL "$p" >/dev/null 2>&1 || true; done
    for p in $ids; do
      for _ in $(seq 1 50); do ctr_ tasks ls 2>/dev/null | grep -q "^$p .*RUNNING" || break; sleep 0.1; done
      ctr_ tasks delete -f "$p" >/dev/null 2>&1 || true
    done
  fi
  stop_pid containerd containerd
  local shim
  for shim in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true); do
    kill -9 "$shim" 2>/dev/null || true
  done
  # Processes of containers whose shim died first: in our kubepods cgroups.
  local cg pid
  for cg in /sys/fs/cgroup/*/kubepods; do
    [ -d "$cg" ] || continue
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done
  done
  [ -x "$KBIN/kube-proxy" ] && "$KBIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  remove_iptables
  local m
  for m in $(our_mounts); do umount -l "$m" 2>/dev/null || umount -f "$m" 2>/dev/null || true; done
  if [ -d /run/netns ]; then
    for m in /run/netns/cni-*; do
      [ -e "$m" ] || continue
      grep -qx "$(basename "$m")" "$NDIR/netns.before" 2>/dev/null || rm -f "$m"
    done
    rmdir /run/netns 2>/dev/null || true
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link delete "$BRIDGE" && { [ -n "$QUIET" ] || log "removed the bridge $BRIDGE"; }
  fi
  # The kubepods cgroups, deepest first (they are empty once every container is gone).
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/unified/kubepods; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  if [ -f "$NDIR/sysctl.before" ]; then
    sysctl -qw $(cat "$NDIR/sysctl.before") || true
    rm -f "$NDIR/sysctl.before"
  fi
  rm -f "$NDIR/netns.before"
  rm -rf "$NDIR/containerd/state" "$NDIR/kubelet" "$NDIR/pod-logs" "$NDIR/cni/ipam"
  # The processes' logs stay (for a start that failed); the rest of the run goes.
  [ ! -d "$RUN" ] || find "$RUN" -mindepth 1 ! -name '*.log' -exec rm -rf {} + 2>/dev/null || true
  local left; left=$(our_mounts)
  [ -z "$left" ] || log "WARNING: still mounted: $left"
}

cmd_status() {
  local p
  if pid_ours containerd containerd; then echo "containerd: running (pid $(pid_of containerd))"; else echo "containerd: stopped"; fi
  for p in "${PROCS[@]}"; do
    if pid_ours "$p" "$p"; then echo "$p: running (pid $(pid_of "$p"))"; else echo "$p: stopped"; fi
  done
}

cmd=${1:-}; shift || true
case "$cmd" in
  build) cmd_build ;;
  up) cmd_up ;;
  load) cmd_load "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: e2e/node/node.sh build|up|load FILE...|down|status" ;;
esac
