#!/usr/bin/env python3
"""Admission latency and cost of the sidecar-injection webhook at a fixed Pod creation rate.

    bench/webhook.py [--rate 50] [--seconds 20] [--skip-build]

Starts the local Kubernetes control plane and helm through e2e/services, builds the release
webhook, renders the chart for a URL webhook (only matching a fresh namespace) and applies it,
runs the webhook as a process, creates a ShotoverTopology, then creates Pods at --rate per
second for --seconds, open loop (4 client threads on kept-alive HTTPS connections to the
apiserver, as the admin user):

  direct    Pods without the opt-in label: the apiserver does not call the webhook;
  injected  Pods with `shotover.io/inject: "true"`: every one is admitted through the webhook.

Prints, side by side, the Pod creations per second achieved, the client-side create latency
(p50/p99, apiserver + etcd + webhook), the webhook's own time per admission (from its
`micros=` log lines, exact), the share of webhook calls the apiserver timed at 5 ms or less
(its `apiserver_admission_webhook_admission_duration_seconds` histogram), and the webhook's CPU
seconds and RSS (VmRSS now, VmHWM peak). Deletes the namespaces at the end.
"""
import argparse
import base64
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import ROOT, cpu_seconds, free_port, proc_status_mib, services_env


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Api:
    """HTTPS to the apiserver with the admin client certificate of KUBECONFIG."""

    def __init__(self, kubeconfig):
        text = open(kubeconfig).read()

        def field(name):
            m = re.search(rf"{name}: (\S+)", text)
            if not m:
                sys.exit(f"{kubeconfig} has no {name}")
            return m.group(1)

        self.dir = tempfile.mkdtemp(prefix="bench-webhook-")
        paths = {}
        for name in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
            paths[name] = os.path.join(self.dir, name)
            with open(paths[name], "wb") as f:
                f.write(base64.b64decode(field(name)))
        server = field("server")
        self.host, self.port = server.removeprefix("https://").split(":")
        self.context = ssl.create_default_context(cafile=paths["certificate-authority-data"])
        self.context.load_cert_chain(paths["client-certificate-data"], paths["client-key-data"])

    def connection(self):
        return http.client.HTTPSConnection(self.host, int(self.port), context=self.context,
                                           timeout=30)

    def get(self, path):
        c = self.connection()
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()


def kubectl(env, *args, input=None):
    result = subprocess.run(["kubectl", *args], env=env, input=input, text=True,
                            capture_output=True)
    if result.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def pod(i, inject):
    labels = {"app": "bench"}
    annotations = {}
    if inject:
        labels["shotover.io/inject"] = "true"
        annotations["shotover.io/topology"] = "cache"
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{'inj' if inject else 'dir'}-{i}", "labels": labels,
                     "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    })


def load(api, namespace, rate, seconds, inject, threads=4):
    """Creates rate*seconds Pods on a fixed schedule; returns (latencies s, errors, elapsed)."""
    total = int(rate * seconds)
    latencies, errors = [], []
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def worker(k):
        conn = api.connection()
        for i in range(k, total, threads):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod(i, inject),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 201
            except (OSError, http.client.HTTPException) as e:
                ok, body = False, str(e).encode()
                conn = api.connection()
            t1 = time.perf_counter()
            with lock:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors.append(body[:300])

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return latencies, errors, time.perf_counter() - start


def apiserver_webhook_histogram(api):
    """(calls, calls <= 5 ms) of our webhook, from the apiserver's metrics."""
    status, text = api.get("/metrics")
    if status != 200:
        return 0, 0
    count = le5 = 0.0
    for line in text.splitlines():
        if not line.startswith("apiserver_admission_webhook_admission_duration_seconds") or \
                'name="pods.inject.shotover.io"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if "_count{" in line:
            count += value
        elif '_bucket{' in line and 'le="0.005"' in line:
            le5 += value
    return count, le5




def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()

    exports = services_env("kube", "helm")
    env = dict(os.environ)
    for key, value in exports.items():
        env[key] = os.path.expandvars(value)
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover-webhook"],
                       cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/shotover-webhook")
    api = Api(env["KUBECONFIG"])

    ns = f"bench-webhook-{os.getpid()}"
    sys_ns = f"{ns}-system"
    release = f"bw{os.getpid()}"
    port = free_port()
    http_port = free_port()
    kubectl(env, "create", "namespace", ns)
    kubectl(env, "create", "namespace", sys_ns)
    selector = json.dumps([{"key": "kubernetes.io/metadata.name", "operator": "In",
                            "values": [ns]}])
    # Offline, helm assumes Kubernetes 1.20, below the chart's kubeVersion.
    server = json.loads(kubectl(env, "version", "-o", "json"))["serverVersion"]["gitVersion"]
    rendered = subprocess.run(
        [env["HELM"], "template", release, os.path.join(ROOT, "charts/shotover"),
         "--kube-version", server,
         "--namespace", sys_ns, "--set", f"webhook.url=https://127.0.0.1:{port}/inject",
         "--set", "webhook.certificate.names={127.0.0.1}", "--set", "operator.enabled=false",
         "--set-json", f"webhook.namespaceSelector={selector}"],
        check=True, text=True, capture_output=True).stdout
    kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", "-", input=rendered)
    log_path = os.path.join(tempfile.gettempdir(), f"bench-webhook-{os.getpid()}.log")
    log = open(log_path, "w")
    webhook = subprocess.Popen(
        [binary, "--addr", f"127.0.0.1:{port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--namespace", sys_ns, "--watch-namespace", ns, "--secret-name", f"{release}-webhook-tls",
         "--webhook-config-name", f"{release}-sidecar-injector", "--cert-name", "127.0.0.1",
         "--shutdown-delay", "0s"],
        env={**env, "RUST_LOG": "info"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1)
                break
            except OSError:
                if time.time() > deadline or webhook.poll() is not None:
                    sys.exit(f"the webhook did not get ready; see {log_path}")
                time.sleep(0.1)
        kubectl(env, "apply", "-n", ns, "-f", "-", input=json.dumps({
            "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
            "metadata": {"name": "cache"},
            "spec": {"sources": [{"Redis": {"name": "redis", "listenAddr": "127.0.0.1:6380",
                                            "chain": [{"RedisSinkSingle": {
                                                "remoteAddress": "redis.db:6379"}}]}}]}}))
        # Wait until the caBundle is in place and one injection works (warms the cache).
        deadline = time.time() + 30
        while True:
            c = api.connection()
            c.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", body=pod(0, True),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            body = r.read()
            if r.status == 201 and b"shotover" in body:
                break
            if time.time() > deadline:
                sys.exit(f"no injection within 30 s: {body[:300]}")
            time.sleep(0.2)

        idle_rss = proc_status_mib(webhook.pid, "VmRSS")
        rows = []
        for phase, inject in (("direct", False), ("injected", True)):
            calls0, le5_0 = apiserver_webhook_histogram(api)
            cpu0 = cpu_seconds(webhook.pid)
            mark = os.path.getsize(log_path)
            lat, errors, elapsed = load(api, ns, args.rate, args.seconds, inject)
            cpu = cpu_seconds(webhook.pid) - cpu0
            calls1, le5_1 = apiserver_webhook_histogram(api)
            log.flush()
            with open(log_path) as f:
                f.seek(mark)
                micros = [int(m) / 1e6 for m in re.findall(r"micros=(\d+)", f.read())]
            rows.append((phase, len(lat), len(errors), len(lat) / elapsed, lat, micros,
                         calls1 - calls0, le5_1 - le5_0, cpu))
            if errors:
                print(f"{phase}: {len(errors)} failed creations, first: {errors[0]!r}")

        print(f"\nPod creations at {args.rate:g}/s for {args.seconds:g} s, local control plane "
              f"(2 cores shared by etcd, kube-apiserver, kube-controller-manager, the webhook and "
              f"this client)\n")
        print("| path | Pods created | failed | creates/s | create p50 ms | create p99 ms | "
              "webhook p50 ms | webhook p99 ms | webhook max ms | apiserver-timed calls ≤ 5 ms | "
              "webhook CPU s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for phase, ok, failed, rate, lat, micros, calls, le5, cpu in rows:
            share = f"{le5:.0f} of {calls:.0f}" if calls else "no calls"
            wp50 = f"{percentile(micros, 50) * 1e3:.2f}" if micros else "-"
            wp99 = f"{percentile(micros, 99) * 1e3:.2f}" if micros else "-"
            wmax = f"{max(micros) * 1e3:.2f}" if micros else "-"
            print(f"| {phase} | {ok} | {failed} | {rate:.1f} | {percentile(lat, 50) * 1e3:.2f} | "
                  f"{percentile(lat, 99) * 1e3:.2f} | {wp50} | {wp99} | {wmax} | {share} | "
                  f"{cpu:.2f} |")
        print(f"\nwebhook RSS: {idle_rss:.1f} MiB idle (caches filled), "
              f"{proc_status_mib(webhook.pid, 'VmRSS'):.1f} MiB after the load, "
              f"peak (VmHWM) {proc_status_mib(webhook.pid, 'VmHWM'):.1f} MiB")
    finally:
        webhook.send_signal(signal.SIGTERM)
        try:
            webhook.wait(timeout=10)
        except subprocess.TimeoutExpired:
            webhook.kill()
        subprocess.run(["kubectl", "delete", "mutatingwebhookconfiguration",
                        f"{release}-sidecar-injector", "--ignore-not-found", "--wait=false"],
                       env=env, capture_output=True)
        subprocess.run(["kubectl", "delete", "namespace", ns, sys_ns, "--wait=false"], env=env,
                       capture_output=True)


if __name__ == "__main__":
    main()
