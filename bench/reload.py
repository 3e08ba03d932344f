#!/usr/bin/env python3
"""Hot reload of a 50-source topology under load: time to apply, requests failed, RSS.

    bench/reload.py [--sources 50] [--reloads 6] [--seconds 4] [--skip-build]

Starts Redis through e2e/services and the release proxy with a topology of N Redis sources
(each its own port, each a RedisSinkSingle to that Redis) and `--watch-interval-ms 100`. One
client thread per source (redis-py, one connection each, kept open throughout) runs
SET k i / GET k and checks every answer. Each reload rewrites the topology (renamed over
the file) so that every chain changes: a QueryCounter is added in front of every sink, then
removed, and so on. Per reload it reports the time from the rename to
`shotover_config_reloads_count{result="applied"}` moving (the proxy's own `took_ms` too),
the time until every open connection has moved to the new chain
(`shotover_connections_draining_count` back to 0), requests per second in the window
around it, failed or wrong answers, and the proxy's RSS before and after.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import ROOT, free_port, rss_mib, services_env, sh

# redis-py, not bench/redis.py next to this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
import redis  # noqa: E402

sys.path.insert(0, _here)

OURS_BIN = os.path.join(ROOT, "target/release/shotover")


def topology(ports, upstream, counted):
    out = ["sources:"]
    for i, port in enumerate(ports):
        out += [
            "  - Redis:",
            f'      name: "s{i}"',
            f'      listen_addr: "127.0.0.1:{port}"',
            "      chain:",
        ]
        if counted:
            out.append(f'        - QueryCounter: {{ counter_name: "c{i}" }}')
        out.append(f'        - RedisSinkSingle: {{ remote_address: "{upstream}" }}')
    return "\n".join(out) + "\n"


def metrics(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


def total(text, prefix):
    s = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            s += float(line.rsplit(" ", 1)[1])
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=50)
    ap.add_argument("--reloads", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0, help="load between reloads")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    env = services_env("redis")
    upstream = env["REDIS_ADDR"]
    if not args.skip_build:
        sh(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT)
    commit = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()

    work = tempfile.mkdtemp(prefix="shotover-bench-reload-")
    ports = [free_port() for _ in range(args.sources)]
    obs = f"127.0.0.1:{free_port()}"
    topo_path = os.path.join(work, "topology.yaml")
    with open(topo_path, "w") as f:
        f.write(topology(ports, upstream, False))
    with open(os.path.join(work, "config.yaml"), "w") as f:
        f.write(f'main_log_level: "info"\nobservability_interface: "{obs}"\n')
    log = open(os.path.join(work, "shotover.log"), "w")
    proxy = subprocess.Popen(
        [OURS_BIN, "-t", topo_path, "-c", os.path.join(work, "config.yaml"),
         "--watch-interval-ms", "100"],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while True:
        try:
            if urllib.request.urlopen(f"http://{obs}/ready", timeout=1).status == 200:
                break
        except Exception:
            pass
        if time.time() > deadline:
            sys.exit("the proxy did not get ready")
        time.sleep(0.05)

    stop = threading.Event()
    done = [0] * args.sources
    failures = []

    def client(i):
        try:
            run_client(i)
        except Exception as e:  # noqa: BLE001 - a client that dies is a failure
            failures.append(f"source {i}: client died: {e!r}")

    def run_client(i):
        r = redis.Redis(host="127.0.0.1", port=ports[i], socket_timeout=10)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                r.set(f"bench-reload:{i}", n)
                got = r.get(f"bench-reload:{i}")
                if got != str(n).encode():
                    failures.append(f"source {i}: GET gave {got!r}, expected {n}")
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(f"source {i}: {e}")
                r = redis.Redis(host="127.0.0.1", port=ports[i], socket_timeout=10)
            done[i] += 2

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.sources)]
    for t in threads:
        t.start()
    time.sleep(args.seconds)

    rows = []
    for reload in range(1, args.reloads + 1):
        rss_before = rss_mib(proxy.pid)
        before_fail = len(failures)
        start_done, t_start = sum(done), time.time()
        tmp = topo_path + ".new"
        with open(tmp, "w") as f:
            f.write(topology(ports, upstream, reload % 2 == 1))
        os.rename(tmp, topo_path)
        t0 = time.time()
        applied_at = moved_at = None
        while time.time() - t0 < 30:
            text = metrics(obs)
            if applied_at is None and total(text, 'shotover_config_reloads_count{result="applied"}') >= reload:
                applied_at = time.time()
            if applied_at is not None and total(text, "shotover_connections_draining_count") == 0 \
                    and total(text, "shotover_connections_moved_count") >= reload * args.sources:
                moved_at = time.time()
                break
            time.sleep(0.01)
        time.sleep(args.seconds)
        rate = (sum(done) - start_done) / (time.time() - t_start)
        log.flush()
        took = re.findall(r"took_ms=(\d+)", open(os.path.join(work, "shotover.log")).read())
        rows.append({
            "reload": reload,
            "chains": "QueryCounter added" if reload % 2 == 1 else "QueryCounter removed",
            "applied_ms": (applied_at - t0) * 1000 if applied_at else None,
            "took_ms": int(took[-1]) if len(took) >= reload else None,
            "moved_ms": (moved_at - t0) * 1000 if moved_at else None,
            "rate": rate,
            "failed": len(failures) - before_fail,
            "rss_before": rss_before,
            "rss_after": rss_mib(proxy.pid),
        })
    stop.set()
    for t in threads:
        t.join(timeout=15)
    text = metrics(obs)
    proxy.terminate()
    proxy.wait(timeout=30)

    print(f"# bench/reload.py at {commit}: {args.sources} sources, one client connection each, "
          f"{args.reloads} reloads, {args.seconds} s of load after each")
    print()
    print("| reload | every chain | rename to applied ms | proxy's took_ms | rename to every connection moved ms | req/s around it | failed | RSS before MiB | RSS after MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    for r in rows:
        print(f"| {r['reload']} | {r['chains']} | {fmt(r['applied_ms'])} | {fmt(r['took_ms'])} | "
              f"{fmt(r['moved_ms'])} | {r['rate']:,.0f} | {r['failed']} | {r['rss_before']:.1f} | {r['rss_after']:.1f} |")
    print()
    refused = total(text, 'shotover_config_reloads_count{result="refused"}')
    print(f"requests failed in all: {len(failures)}; connections moved: "
          f"{total(text, 'shotover_connections_moved_count'):.0f}, retired: "
          f"{total(text, 'shotover_connections_retired_count'):.0f}; "
          f"refused reloads: {refused:.0f}")
    if applied := [r["applied_ms"] for r in rows if r["applied_ms"]]:
        print(f"median rename to applied: {statistics.median(applied):.0f} ms (the watch interval is 100 ms)")
    for f in failures[:10]:
        print("failure:", f)


if __name__ == "__main__":
    main()
