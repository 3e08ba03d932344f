#!/usr/bin/env bash
# Smoke test of the control plane that e2e/kube/kube.sh starts:
#   - kubectl apply of a ConfigMap, read back
#   - a CRD with a CEL rule (x-kubernetes-validations): a valid object is accepted, a
#     violating one is rejected with the rule's message
#   - a StatefulSet: the controller-manager creates its Pod, the Pod (never run: no kubelet) is
#     marked Ready through the status subresource, and status.readyReplicas becomes 1
#   - garbage collection: deleting the StatefulSet (cascade background) removes its Pod
#   - a mutating admission webhook (a tiny Python HTTPS server on 127.0.0.1, registered by
#     clientConfig.url + caBundle, as the sidecar-injector tests will do) patches a new Pod
#   - deleting a namespace with objects in it: the namespace goes away
#
#   e2e/kube/smoke.sh          (starts the control plane with `kube.sh up` if it is not up)
#
# Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
# Every wait is bounded polling.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
eval "$("$HERE/kube.sh" up)"

NS="smoke-$$"
passed=0 failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }

# poll SECONDS COMMAND...: retries COMMAND every 0.2 s until it succeeds or SECONDS pass.
poll() {
  local secs=$1; shift
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

WORK="$(mktemp -d)"
WEBHOOK_PID=
cleanup() {
  [ -z "$WEBHOOK_PID" ] || kill "$WEBHOOK_PID" 2>/dev/null || true
  kubectl delete mutatingwebhookconfiguration "smoke-$$" --ignore-not-found >/dev/null 2>&1 || true
  rm -rf "$WORK"
  kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kubectl delete crd smokewidgets.e2e.shotover.io --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

kubectl create namespace "$NS" >/dev/null
if poll 30 kubectl get serviceaccount default -n "$NS"; then ok "namespace $NS got its default ServiceAccount"
else fail "namespace $NS got no default ServiceAccount in 30 s"; fi

# --- ConfigMap
kubectl apply -n "$NS" -f - >/dev/null <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: smoke}
data: {hello: world}
EOF
if [ "$(kubectl get configmap smoke -n "$NS" -o jsonpath='{.data.hello}')" = world ]; then ok "ConfigMap applied and read back"
else fail "ConfigMap not read back"; fi

# --- CRD with a CEL validation rule
kubectl apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: smokewidgets.e2e.shotover.io}
spec:
  group: e2e.shotover.io
  scope: Namespaced
  names: {plural: smokewidgets, singular: smokewidget, kind: SmokeWidget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas, maxReplicas]
            properties:
              replicas: {type: integer}
              maxReplicas: {type: integer}
            x-kubernetes-validations:
            - rule: self.replicas <= self.maxReplicas
              message: replicas must not exceed maxReplicas
EOF
if poll 30 kubectl wait --for=condition=Established --timeout=5s crd/smokewidgets.e2e.shotover.io \
   && poll 30 kubectl get smokewidgets -n "$NS"; then ok "CRD established and served"
else fail "CRD not established in 30 s"; fi
if kubectl apply -n "$NS" -f - >/dev/null 2>&1 <<'EOF'
apiVersion: e2e.shotover.io/v1
kind: SmokeWidget
metadata: {name: good}
spec: {replicas: 1, maxReplicas: 3}
EOF
then ok "valid SmokeWidget accepted"; else fail "valid SmokeWidget rejected"; fi
if out=$(kubectl apply -n "$NS" -f - 2>&1 <<'EOF'
apiVersion: e2e.shotover.io/v1
kind: SmokeWidget
metadata: {name: bad}
spec: {replicas: 5, maxReplicas: 3}
EOF
); then fail "violating SmokeWidget was accepted"
elif grep -q 'replicas must not exceed maxReplicas' <<<"$out"; then ok "violating SmokeWidget rejected by the CEL rule"
else fail "violating SmokeWidget rejected for another reason: $out"; fi

# --- StatefulSet: Pod created by the controller-manager, marked Ready by hand
kubectl apply -n "$NS" -f - >/dev/null <<'EOF'
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  replicas: 1
  serviceName: web
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: example.invalid/never-pulled:1}
EOF
if poll 30 kubectl get pod web-0 -n "$NS"; then ok "StatefulSet controller created Pod web-0"
else fail "no Pod web-0 within 30 s"; fi
kubectl patch pod web-0 -n "$NS" --subresource=status --type=merge \
  -p '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}' >/dev/null
ready() { [ "$(kubectl get statefulset web -n "$NS" -o jsonpath='{.status.readyReplicas}')" = 1 ]; }
if poll 30 ready; then ok "Pod marked Ready via the status subresource: StatefulSet readyReplicas=1"
else fail "readyReplicas not 1 within 30 s: $(kubectl get statefulset web -n "$NS" -o jsonpath='{.status}')"; fi

# --- garbage collection of owned objects
kubectl delete statefulset web -n "$NS" --cascade=background --wait=false >/dev/null
gone() { ! kubectl get pod web-0 -n "$NS" >/dev/null 2>&1; }
if poll 30 gone; then ok "deleting the StatefulSet garbage-collected its Pod"
else fail "Pod web-0 still there 30 s after its StatefulSet was deleted"; fi

# --- mutating admission webhook on 127.0.0.1 (what the sidecar injector tests need)
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=smoke-webhook-ca \
  -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$WORK/ext.cnf"
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial -days 1 \
  -extfile "$WORK/ext.cnf" -out "$WORK/tls.crt" 2>/dev/null
cat > "$WORK/webhook.py" <<'EOF'
# Adds the label e2e.shotover.io/mutated=true to every object it is asked about.
import base64, http.server, json, ssl, sys
cert, key, portfile = sys.argv[1:4]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        req = review["request"]
        patch = [] if req["object"]["metadata"].get("labels") else [{"op": "add", "path": "/metadata/labels", "value": {}}]
        patch.append({"op": "add", "path": "/metadata/labels/e2e.shotover.io~1mutated", "value": "true"})
        out = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                          "response": {"uid": req["uid"], "allowed": True, "patchType": "JSONPatch",
                                       "patch": base64.b64encode(json.dumps(patch).encode()).decode()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(portfile + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.rename(portfile + ".tmp", portfile)
server.serve_forever()
EOF
python3 "$WORK/webhook.py" "$WORK/tls.crt" "$WORK/tls.key" "$WORK/port" </dev/null >"$WORK/webhook.log" 2>&1 &
WEBHOOK_PID=$!
poll 10 test -s "$WORK/port" || { cat "$WORK/webhook.log"; echo "FAILED: webhook server did not start"; exit 1; }
kubectl apply -f - >/dev/null <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: smoke-$$}
webhooks:
- name: smoke.e2e.shotover.io
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
  clientConfig:
    url: https://127.0.0.1:$(cat "$WORK/port")/mutate
    caBundle: $(base64 -w0 < "$WORK/ca.crt")
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: $NS}}
  rules:
  - {operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}
EOF
cat > "$WORK/pod.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: plain, labels: {app: plain}}
spec:
  containers:
  - {name: app, image: example.invalid/never-pulled:1}
EOF
# The apiserver picks the new configuration up asynchronously: poll with a server-side dry run.
mutated() { [ "$(kubectl create -n "$NS" --dry-run=server -f "$WORK/pod.yaml" -o jsonpath='{.metadata.labels.e2e\.shotover\.io/mutated}')" = true ]; }
if poll 30 mutated && kubectl create -n "$NS" -f "$WORK/pod.yaml" >/dev/null \
   && [ "$(kubectl get pod plain -n "$NS" -o jsonpath='{.metadata.labels.e2e\.shotover\.io/mutated}')" = true ]; then
  ok "mutating webhook at https://127.0.0.1:$(cat "$WORK/port") patched a new Pod"
else fail "mutating webhook did not patch the Pod: $(cat "$WORK/webhook.log")"; fi

# --- namespace deletion
kubectl delete namespace "$NS" --wait=false >/dev/null
ns_gone() { ! kubectl get namespace "$NS" >/dev/null 2>&1; }
if poll 60 ns_gone; then ok "namespace $NS deleted with its objects"
else fail "namespace $NS still there after 60 s: $(kubectl get namespace "$NS" -o jsonpath='{.status}')"; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
