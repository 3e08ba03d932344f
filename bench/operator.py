#!/usr/bin/env python3
"""How fast the operator brings N ShotoverTopologies to ConfigValid, and what it costs.

    bench/operator.py [--objects 500] [--skip-build] [--binary PATH]

Starts the local Kubernetes control plane through e2e/services (etcd, kube-apiserver,
kube-controller-manager; no kubelet), builds the release operator, installs the CRD it
prints (`shotover-operator crd | kubectl apply --server-side -f -`), creates a fresh
namespace and runs the operator on it as a process (leader Lease in that namespace).

Phase 1 applies N small Redis topologies (no dbSide: each renders one ConfigMap) as one
multi-document `kubectl apply --server-side`, then polls every 0.5 s (`kubectl get -o json`
of the whole list, and of the ConfigMaps labelled managed-by=shotover-operator) until every
object reports ConfigValid=True with a configHash and every ConfigMap exists. Phase 2
changes every object's chain (another counterName) and waits until every object reports a
new configHash for generation 2 and every ConfigMap carries it.

Prints the apply time, the time to all ConfigValid and to all ConfigMaps (from the start of
the apply), the throughput, the operator's reconciles (/metrics), CPU seconds
(/proc/PID/stat) and RSS (VmHWM peak and VmRSS now, /proc/PID/status). Then it stops the
operator with SIGTERM and deletes the namespace.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import ROOT, cpu_seconds, free_port, proc_status_mib, services_env

POLL_SECONDS = 0.5
MANAGED = "app.kubernetes.io/managed-by=shotover-operator"
HASH_ANNOTATION = "shotover.io/config-hash"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Kube:
    """kubectl against the control plane that e2e/services started."""

    def __init__(self):
        try:
            exports = services_env("kube")
        except subprocess.CalledProcessError as e:
            sys.exit(f"bench/operator.py needs the local Kubernetes control plane, and "
                     f"`e2e/services up kube` failed (exit {e.returncode}):\n{e.stderr}")
        self.env = dict(os.environ)
        for key, value in exports.items():
            self.env[key] = os.path.expandvars(value)
        if "KUBECONFIG" not in exports:
            sys.exit("`e2e/services up kube` exported no KUBECONFIG")
        self.run("get", "--raw", "/readyz")

    def run(self, *args, input=None):
        result = subprocess.run(["kubectl", "--request-timeout=60s", *args], env=self.env,
                                input=input, text=True, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed (exit {result.returncode}):\n"
                               f"{result.stderr.strip()}")
        return result.stdout

    def items(self, *args):
        return json.loads(self.run("get", *args, "-o", "json"))["items"]


def topology(name, counter):
    """One small Redis topology, without dbSide: the operator renders only its ConfigMap."""
    return f"""apiVersion: shotover.io/v1alpha1
kind: ShotoverTopology
metadata:
  name: {name}
spec:
  sources:
    - Redis:
        name: redis
        listenAddr: 0.0.0.0:6379
        chain:
          - QueryCounter:
              counterName: {counter}
          - RedisSinkSingle:
              remoteAddress: redis:6379
              connectTimeoutMs: 3000
"""


def manifest(names, suffix):
    return "---\n".join(topology(name, f"{name}-{suffix}") for name in names)


def condition(obj, type_):
    for c in (obj.get("status") or {}).get("conditions", []):
        if c.get("type") == type_:
            return c
    return None




def scrape(port):
    """The operator's /metrics as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series] = float(value)
    return values


class Operator:
    def __init__(self, binary, namespace, kube, workdir):
        self.port = free_port()
        self.log_path = os.path.join(workdir, "operator.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--namespace", namespace, "--http-addr", f"127.0.0.1:{self.port}",
             "--lease-namespace", namespace],
            env=kube.env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self):
        return self.proc.pid

    def check_alive(self):
        if self.proc.poll() is not None:
            self.fail(f"the operator exited with code {self.proc.returncode}")

    def log_tail(self, lines=30):
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def fail(self, message):
        sys.exit(f"{message}; end of its log ({self.log_path}):\n{self.log_tail()}")

    def wait_leader(self, timeout=60):
        """Until /metrics says this process holds the Lease and reconciles."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if scrape(self.port).get("shotover_operator_leader") == 1:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.fail(f"the operator did not become the leader within {timeout} s")

    def metrics(self):
        return scrape(self.port)

    def problems(self):
        """WARN and ERROR lines of its log (read after stop, so shutdown is included)."""
        with open(self.log_path) as f:
            lines = [ANSI.sub("", line) for line in f]
        return [line for line in lines if " WARN " in line or " ERROR " in line]

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print(f"the operator did not stop within {timeout} s of SIGTERM: killed", file=sys.stderr)
        self.log.close()
        return self.proc.returncode


def wait_all(kube, operator, namespace, names, timeout, done_object, done_config_map):
    """Polls until every topology satisfies done_object and every ConfigMap done_config_map.

    Returns the seconds (from now) until each was first seen complete. Times are taken when
    the `kubectl get` that showed it returned, so each is late by at most one poll interval
    plus one `kubectl get`.
    """
    start = time.monotonic()
    deadline = start + timeout
    wanted = set(names)
    objects_at = config_maps_at = None
    objects, config_maps = {}, {}
    while True:
        poll_start = time.monotonic()
        operator.check_alive()
        objects = {o["metadata"]["name"]: o for o in kube.items("shotovertopologies", "-n", namespace)}
        config_maps = {c["metadata"]["name"]: c for c in kube.items("configmaps", "-n", namespace, "-l", MANAGED)}
        now = time.monotonic()
        if objects_at is None and all(n in objects and done_object(objects[n]) for n in wanted):
            objects_at = now - start
        if config_maps_at is None and all(
                done_config_map(objects.get(n), config_maps.get(f"{n}-shotover-config")) for n in wanted):
            config_maps_at = now - start
        if objects_at is not None and config_maps_at is not None:
            return objects_at, config_maps_at
        if now > deadline:
            pending = sorted(n for n in wanted if n not in objects or not done_object(objects[n]))
            missing = sorted(n for n in wanted
                             if not done_config_map(objects.get(n), config_maps.get(f"{n}-shotover-config")))
            example = pending[0] if pending else (missing[0] if missing else None)
            state = json.dumps((objects.get(example) or {}).get("status"), indent=2) if example else "-"
            operator.fail(f"after {timeout} s: {len(pending)} of {len(wanted)} topologies not done, "
                          f"{len(missing)} ConfigMaps not done; status of {example}:\n{state}\n"
                          f"operator metrics: reconciles {operator.metrics().get('shotover_operator_reconciles_total')}")
        time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - poll_start)))


def snapshot(operator):
    metrics = operator.metrics()
    return {
        "at": time.monotonic(),
        "cpu": cpu_seconds(operator.pid),
        "reconciles": metrics.get("shotover_operator_reconciles_total", 0),
        "errors": sum(v for k, v in metrics.items() if k.startswith("shotover_operator_reconcile_errors_total")),
        "duration_sum": metrics.get("shotover_operator_reconcile_duration_seconds_sum", 0),
        "duration_count": metrics.get("shotover_operator_reconcile_duration_seconds_count", 0),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=500, help="ShotoverTopologies to create (default 500)")
    ap.add_argument("--skip-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/shotover-operator"),
                    help="the operator binary (default target/release/shotover-operator)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each phase may take (default 600)")
    args = ap.parse_args()
    if args.objects < 1:
        sys.exit("--objects must be at least 1")

    kube = Kube()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover-operator"], cwd=ROOT, check=True)
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        sys.exit(f"no operator binary at {binary} (build it, or pass --binary)")

    crd = subprocess.run([binary, "crd"], check=True, text=True, capture_output=True).stdout
    kube.run("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd)
    kube.run("wait", "--for=condition=Established", "--timeout=60s", "crd/shotovertopologies.shotover.io")
    server_version = json.loads(kube.run("version", "-o", "json"))["serverVersion"]["gitVersion"]

    namespace = f"bench-operator-{os.getpid()}"
    kube.run("create", "namespace", namespace)
    workdir = tempfile.mkdtemp(prefix="shotover-operator-bench-")
    operator = None
    try:
        operator = Operator(binary, namespace, kube, workdir)
        operator.wait_leader()
        names = [f"topo-{i:05d}" for i in range(args.objects)]

        # Phase 1: create.
        before = snapshot(operator)
        applied = time.monotonic()
        kube.run("apply", "--server-side", "-n", namespace, "-f", "-", input=manifest(names, "v1"))
        apply_s = time.monotonic() - applied

        def valid(o):
            c = condition(o, "ConfigValid")
            return c is not None and c["status"] == "True" and bool(o["status"].get("configHash"))

        valid_s, config_maps_s = wait_all(
            kube, operator, namespace, names, args.timeout, valid, lambda o, cm: cm is not None)
        valid_s += apply_s
        config_maps_s += apply_s
        created = snapshot(operator)
        hashes = {o["metadata"]["name"]: o["status"]["configHash"]
                  for o in kube.items("shotovertopologies", "-n", namespace)}

        # Phase 2: change every chain.
        applied = time.monotonic()
        kube.run("apply", "--server-side", "-n", namespace, "-f", "-", input=manifest(names, "v2"))
        update_apply_s = time.monotonic() - applied

        def updated(o):
            status = o.get("status") or {}
            c = condition(o, "ConfigValid")
            return (status.get("observedGeneration") == 2 and c is not None and c["status"] == "True"
                    and status.get("configHash") not in (None, hashes[o["metadata"]["name"]]))

        def config_map_updated(o, cm):
            return (o is not None and cm is not None and updated(o)
                    and (cm["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) == o["status"]["configHash"])

        updated_s, updated_config_maps_s = wait_all(
            kube, operator, namespace, names, args.timeout, updated, config_map_updated)
        updated_s += update_apply_s
        updated_config_maps_s += update_apply_s
        changed = snapshot(operator)
        rss_peak = proc_status_mib(operator.pid, "VmHWM")
        rss_end = proc_status_mib(operator.pid, "VmRSS")
        cpu_total = cpu_seconds(operator.pid)
    finally:
        exit_code = operator.stop() if operator else None
        try:
            kube.run("delete", "namespace", namespace, "--wait=false")
        except RuntimeError as e:
            print(f"could not delete namespace {namespace}: {e}", file=sys.stderr)
    problems = operator.problems()

    n = args.objects

    def phase(label, apply_time, objects_time, config_maps_time, start, end):
        reconciles = end["reconciles"] - start["reconciles"]
        count = end["duration_count"] - start["duration_count"]
        mean_ms = (end["duration_sum"] - start["duration_sum"]) / count * 1000 if count else float("nan")
        total = max(objects_time, config_maps_time)
        print(f"| {label} | {n} | {apply_time:.2f} | {objects_time:.2f} | {config_maps_time:.2f} "
              f"| {total - apply_time:.2f} "
              f"| {n / total:,.0f} | {reconciles:.0f} ({reconciles / n:.1f} per object) | {mean_ms:.1f} "
              f"| {end['errors'] - start['errors']:.0f} | {end['cpu'] - start['cpu']:.2f} |")

    print()
    print(f"shotover-operator ({os.path.relpath(binary, ROOT)}), Kubernetes {server_version} control plane "
          f"on loopback (no kubelet), {os.cpu_count()} cores shared by everything, "
          f"`kubectl get` polled every {POLL_SECONDS} s")
    print()
    print("| phase | objects | apply s | to all ConfigValid s | to all ConfigMaps s | of which after the apply s "
          "| objects/s | reconciles | mean reconcile ms | reconcile errors | operator CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    phase("create", apply_s, valid_s, config_maps_s, before, created)
    phase("change every chain", update_apply_s, updated_s, updated_config_maps_s, created, changed)
    print()
    print(f"operator RSS: peak (VmHWM) {rss_peak:.1f} MiB, at the end (VmRSS) {rss_end:.1f} MiB; "
          f"CPU {cpu_total:.2f} s in all (utime+stime, start-up and Lease included); "
          f"reconciles in all {changed['reconciles']:.0f} (shotover_operator_reconciles_total)")
    print(f"operator WARN/ERROR log lines: {len(problems)}; exit code after SIGTERM: {exit_code}")
    for line in problems[:5]:
        print(f"  {line.rstrip()}")
    print("(times run from the start of each `kubectl apply`, which is included: the operator reconciles while "
          "kubectl is still applying; 'after the apply' is the later time minus the apply. The change phase waits "
          "for observedGeneration 2 with a new configHash, and for the ConfigMap's shotover.io/config-hash to "
          f"match. objects/s = objects / the later time. Each time is late by up to {POLL_SECONDS} s plus one "
          "`kubectl get`.)")
    if exit_code != 0:
        sys.exit(f"the operator exited with code {exit_code} after SIGTERM; its log is {workdir}/operator.log")


if __name__ == "__main__":
    main()
