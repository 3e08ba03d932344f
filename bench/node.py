#!/usr/bin/env python3
"""What the Kubernetes half costs on the local node, in one run.

    bench/node.py [--rounds 5] [--skip-build] [--restart-node]

Builds the release images (images/build, unless --skip-build), starts the node through
e2e/services (with --restart-node: stops it first and times a warm start), imports the
images, installs the chart in fresh namespaces, then measures:

  images     size of each image, uncompressed (the layers' files) and compressed (the archive)
  node       warm `e2e/services up kube-node` (control plane + node, binaries cached)
  app        `kubectl apply` of an annotated Deployment (1 replica) -> its Pod Ready (2/2),
             --rounds times; and the same Deployment without the opt-in label (the direct path)
  rollout    a chain change of a 3-replica DB-side tier -> all 3 proxies replaced and Ready,
             --rounds times
  memory     of the DB-side proxies and of the sidecar in their Pods: the container cgroup's
             working set (kubelet's /stats/summary: what a memory limit counts) and the
             processes' VmRSS and RssAnon (/proc), idle and after 20000 requests

Everything shares the machine's 2 cores with the control plane. Deletes its namespaces and
the release at the end.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "0.1.0"


def sh(*args, input=None, check=True, env=None):
    out = subprocess.run(args, input=input, capture_output=True, text=True, env=env)
    if check and out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def kubectl(*args, input=None, check=True):
    return sh("kubectl", *args, input=input, check=check)


def wait(what, check, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def ready_pods(ns, selector):
    pods = json.loads(kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def apply(ns, obj):
    kubectl("apply", "--server-side", "--force-conflicts", "-n", ns, "-f", "-", input=json.dumps(obj))


def image_sizes():
    rows = []
    for name in ("shotover", "shotover-operator", "shotover-webhook"):
        archive = os.path.join(ROOT, "target/images", f"{name}-{VERSION}.oci.tar")
        with tarfile.open(archive) as outer:
            index = json.load(outer.extractfile("index.json"))
            manifest = json.load(outer.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
            unpacked = 0
            for layer in manifest["layers"]:
                blob = outer.extractfile("blobs/sha256/" + layer["digest"].split(":")[1])
                with tarfile.open(fileobj=blob, mode="r:gz") as inner:
                    unpacked += sum(m.size for m in inner.getmembers() if m.isfile())
        rows.append((name, unpacked, sum(l["size"] for l in manifest["layers"])))
    return rows


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def proc_rss(container_id):
    """VmRSS and RssAnon (bytes) of the container's processes, from /proc on this machine."""
    rss = anon = 0
    for root, dirs, _ in os.walk("/sys/fs/cgroup/memory/kubepods"):
        if os.path.basename(root) == container_id:
            with open(os.path.join(root, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with open(f"/proc/{pid}/status") as status:
                        for line in status:
                            if line.startswith("VmRSS:"):
                                rss += int(line.split()[1]) * 1024
                            elif line.startswith("RssAnon:"):
                                anon += int(line.split()[1]) * 1024
            break
    return rss, anon


def memory(node, ns):
    """Per proxy container: the cgroup's working set (what a memory limit counts), and the
    processes' VmRSS (with the binary's and libraries' pages) and RssAnon."""
    summary = json.loads(kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/stats/summary"))
    pods = json.loads(kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
    ids = {}
    for pod in pods:
        for c in pod["status"].get("initContainerStatuses", []) + pod["status"].get("containerStatuses", []):
            if c["name"] == "shotover" and c.get("containerID"):
                ids[pod["metadata"]["name"]] = c["containerID"].split("//")[1]
    out = {}
    for pod in summary["pods"]:
        name = pod["podRef"]["name"]
        if pod["podRef"]["namespace"] != ns or name not in ids:
            continue
        for c in pod.get("containers", []):
            if c["name"] == "shotover":
                out[name] = (c.get("memory", {}).get("workingSetBytes", 0),) + proc_rss(ids[name])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--restart-node", action="store_true")
    args = p.parse_args()
    os.chdir(ROOT)
    if not args.skip_build:
        sh("images/build")
    if args.restart_node:
        sh("e2e/services", "down", "kube-node", "kube")
    start = time.time()
    exports = sh("e2e/services", "up", "kube-node", "helm")
    node_up = time.time() - start
    for line in exports.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            os.environ[key] = os.path.expandvars(value)
    tools = os.environ["KUBE_NODE_TOOLS_IMAGE"]
    node = os.environ["KUBE_NODE_NAME"]
    sh("e2e/services", "load", *[f"target/images/{n}-{VERSION}.oci.tar" for n in ("shotover", "shotover-operator", "shotover-webhook")])

    run = str(os.getpid())
    system, ns, release = f"bench-system-{run}", f"bench-apps-{run}", f"bench{run}"
    kubectl("create", "namespace", system)
    kubectl("create", "namespace", ns)
    try:
        sh(os.environ["HELM"], "install", release, "charts/shotover", "-n", system,
           "--set", "image.pullPolicy=Never", "--set", f"operator.watchNamespace={ns}", "--wait", "--timeout", "5m")
        proxy = f"ghcr.io/shotover-k8s/shotover:{VERSION}"
        apply(ns, {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "redis"},
                   "spec": {"serviceName": "redis", "replicas": 1, "selector": {"matchLabels": {"app": "redis"}},
                            "template": {"metadata": {"labels": {"app": "redis"}}, "spec": {"containers": [{
                                "name": "redis", "image": tools, "imagePullPolicy": "Never",
                                "command": ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--dir", "/tmp"]}]}}}})
        apply(ns, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis"},
                   "spec": {"selector": {"app": "redis"}, "ports": [{"port": 6379}]}})

        def tier(counter):
            return {"apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology", "metadata": {"name": "tier"},
                    "spec": {"image": proxy, "imagePullPolicy": "Never", "dbSide": {"replicas": 3},
                             "sources": [{"Redis": {"name": "redis", "listenAddr": "0.0.0.0:6380", "chain": [
                                 {"QueryCounter": {"name": counter}}, {"RedisSinkSingle": {"remoteAddress": "redis:6379"}}]}}]}}
        apply(ns, tier("c0"))
        apply(ns, {"apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology", "metadata": {"name": "edge"},
                   "spec": {"image": proxy, "imagePullPolicy": "Never",
                            "sources": [{"Redis": {"name": "redis", "listenAddr": "127.0.0.1:6379", "chain": [
                                {"RedisSinkSingle": {"remoteAddress": "tier-shotover:6380"}}]}}]}})
        wait("the tier", lambda: len(ready_pods(ns, "shotover.io/topology=tier")) == 3)

        def deployment(name, inject):
            labels = {"app": name}
            meta = {"labels": dict(labels)}
            if inject:
                meta["labels"]["shotover.io/inject"] = "true"
                meta["annotations"] = {"shotover.io/topology": "edge"}
            return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                    "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": meta, "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "app", "image": tools, "imagePullPolicy": "Never", "command": ["sleep", "100000"]}]}}}}

        app_times = {"direct": [], "injected": []}
        for i in range(args.rounds):
            for path in ("direct", "injected"):
                name = f"{path}-{i}"
                start = time.time()
                apply(ns, deployment(name, path == "injected"))
                wait(f"{name} Ready", lambda: ready_pods(ns, f"app={name}"))
                app_times[path].append(time.time() - start)
                kubectl("delete", "deployment", "-n", ns, name, "--wait=false")

        rollout_times = []
        for i in range(args.rounds):
            old = {p["metadata"]["name"]: p["metadata"]["uid"] for p in ready_pods(ns, "shotover.io/topology=tier")}
            start = time.time()
            apply(ns, tier(f"c{i + 1}"))

            def rolled():
                pods = ready_pods(ns, "shotover.io/topology=tier")
                return len(pods) == 3 and all(p["metadata"]["uid"] not in old.values() for p in pods)
            wait("the rollout", rolled)
            rollout_times.append(time.time() - start)

        apply(ns, deployment("load", True))
        load_pod = wait("the load app", lambda: ready_pods(ns, "app=load"))[0]["metadata"]["name"]
        time.sleep(5)
        idle = memory(node, ns)
        start = time.time()
        kubectl("exec", "-n", ns, load_pod, "-c", "app", "--", "redis-cli", "-h", "127.0.0.1", "-p", "6379",
                "-r", "20000", "incr", "bench:n")
        took = time.time() - start
        total = kubectl("exec", "-n", ns, load_pod, "-c", "app", "--", "redis-cli", "-h", "127.0.0.1", "-p", "6379", "get", "bench:n")
        bench = f"20000 INCRs, one at a time, in {took:.1f} s; Redis counted {total.strip()}"
        time.sleep(2)
        loaded = memory(node, ns)
    finally:
        sh(os.environ["HELM"], "uninstall", release, "-n", system, "--wait", check=False)
        kubectl("delete", "namespace", ns, system, "--wait=false", check=False)

    print(f"\nnode: warm `e2e/services up kube-node helm` {node_up:.1f} s")
    print("\n| image | uncompressed MB | compressed MB |\n|---|---:|---:|")
    for name, unpacked, packed in image_sizes():
        print(f"| {name} | {unpacked / 1e6:.1f} | {packed / 1e6:.1f} |")
    print("\n| measure | rounds | p50 s | max s |\n|---|---:|---:|---:|")
    for label, values in (("apply -> Pod Ready, no sidecar (direct)", app_times["direct"]),
                          ("apply -> Pod Ready 2/2, injected sidecar", app_times["injected"]),
                          ("3-replica DB-side rollout (chain change -> 3 new Ready)", rollout_times)):
        print(f"| {label} | {len(values)} | {statistics.median(values):.2f} | {max(values):.2f} |")
    print(f"\nthrough the sidecar and the tier: {bench}")
    print("\n| proxy | idle: cgroup working set MiB | VmRSS MiB | RssAnon MiB | after 20000 requests: working set MiB | VmRSS MiB | RssAnon MiB |\n|---|---:|---:|---:|---:|---:|---:|")
    for pod in sorted(loaded):
        kind = "sidecar" if pod.startswith("load-") else "DB-side"
        before = idle.get(pod, (0, 0, 0))
        after = loaded[pod]
        cells = " | ".join(f"{v / 2**20:.1f}" for v in before + after)
        print(f"| {kind} {pod} | {cells} |")


if __name__ == "__main__":
    main()
