#!/usr/bin/env python3
"""Redis Cluster direct vs this proxy's RedisSinkCluster vs upstream Shotover's, in one run.

    bench/redis_cluster.py [--rounds 3] [--requests 200000] [--skip-build]

Targets, all in front of the same Redis Cluster (3 masters, 3 replicas, started through
e2e/services up redis-cluster):

  direct    `redis-benchmark --cluster` against the nodes themselves (the client routes)
  ours      this proxy hiding the cluster: a Redis source with one RedisSinkCluster
            (connection_count 1, the default), metrics on and never scraped
  upstream  upstream Shotover 0.7.4 from crates.io (bench/upstream-shotover), a Valkey
            source with one ValkeySinkCluster, metrics on and never scraped

Loads: redis-benchmark `-t set,get` at `-c 50 -P 1 -n R` and `-c 50 -P 16 -n 5R`
(R = --requests), random keys over the whole key space (`-r 100000`) so that every master
gets its share. Rounds are interleaved, the target order rotating; reported are the medians
over rounds of requests/s, p50 and p99, the median of each round's ratio to direct, and
each proxy's CPU time per request (user+system over the SET and GET runs of a load) and RSS
after the load.
"""
import argparse
import csv
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, cpu_seconds, free_port, rss_mib, services_env, sh, wait_port

BENCH = os.path.dirname(os.path.abspath(__file__))
UPSTREAM_DIR = os.path.join(BENCH, "upstream-shotover")
UPSTREAM_BIN = os.path.join(UPSTREAM_DIR, "target/release/upstream-shotover")
OURS_BIN = os.path.join(ROOT, "target/release/shotover")
LOADS = [(50, 1, 1.0), (50, 16, 5.0)]
TESTS = ("SET", "GET")


def log(msg):
    print(f"bench/redis_cluster.py: {msg}", file=sys.stderr, flush=True)


def bench(port, clients, pipeline, requests, cluster):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-r", "100000",
           "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "--csv"]
    if cluster:
        cmd.append("--cluster")
    out = sh(cmd, timeout=900)
    # With --cluster, redis-benchmark prints the masters first; the CSV starts at its header.
    out = out[out.find('"test"'):]
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        name = row["test"].split(":")[0].strip()
        rows[name] = {"rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]) * 1000,
                      "p99": float(row["p99_latency_ms"]) * 1000}
    missing = [t for t in TESTS if t not in rows]
    if missing:
        raise RuntimeError(f"{' '.join(cmd)} reported no {missing}: {out!r}")
    return rows


def start(key, binary, kind_source, kind_sink, points, tmp):
    port, obs = free_port(), free_port()
    topo = os.path.join(tmp, f"{key}-topology.yaml")
    with open(topo, "w") as f:
        f.write(f"""sources:
  - {kind_source}:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - {kind_sink}:
            first_contact_points: [{", ".join(f'"{p}"' for p in points)}]
            connect_timeout_ms: 3000
""")
    conf = os.path.join(tmp, f"{key}-config.yaml")
    with open(conf, "w") as f:
        f.write(f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs}"\n')
    logfile = open(os.path.join(tmp, f"{key}.log"), "w")
    proc = subprocess.Popen([binary, "-t", topo, "-c", conf], stdout=logfile, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except SystemExit:
        proc.kill()
        with open(os.path.join(tmp, f"{key}.log")) as f:
            raise RuntimeError(f"{key} did not start: {f.read()[-2000:]}") from None
    # Through the proxy, then read back from the cluster directly: it fronts this cluster.
    sh(["redis-cli", "-p", str(port), "set", f"bench:check:{key}", key])
    got = sh(["redis-cli", "-c", "-p", points[0].rsplit(":", 1)[1], "get", f"bench:check:{key}"]).strip()
    if got != key:
        raise RuntimeError(f"{key} does not front the cluster: {got!r}")
    return port, proc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    env = services_env("redis-cluster")
    points = env["REDIS_CLUSTER_ADDRS"].split(",")
    if not args.skip_build:
        log("building this proxy (release) and upstream Shotover")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=UPSTREAM_DIR, check=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        procs = {}
        ports = {"direct": int(points[0].rsplit(":", 1)[1])}
        ports["ours"], procs["ours"] = start("ours", OURS_BIN, "Redis", "RedisSinkCluster", points, tmp)
        ports["upstream"], procs["upstream"] = start("upstream", UPSTREAM_BIN, "Valkey", "ValkeySinkCluster",
                                                     points, tmp)
        targets = ["direct", "ours", "upstream"]
        results = {}  # (target, load) -> list of {test: row}
        cpu = {}  # (target, load) -> list of µs/request
        try:
            for r in range(args.rounds):
                order = targets[r % 3:] + targets[:r % 3]
                for clients, pipeline, share in LOADS:
                    n = int(args.requests * share)
                    for t in order:
                        proc = procs.get(t)
                        before = cpu_seconds(proc.pid) if proc else 0
                        rows = bench(ports[t], clients, pipeline, n, t == "direct")
                        if proc:
                            cpu.setdefault((t, (clients, pipeline)), []).append(
                                (cpu_seconds(proc.pid) - before) / (2 * n) * 1e6)
                        results.setdefault((t, (clients, pipeline)), []).append(rows)
                        log(f"round {r + 1} -c {clients} -P {pipeline} {t}: "
                            + ", ".join(f"{k} {rows[k]['rps']:.0f}/s" for k in TESTS))
            rss = {t: rss_mib(p.pid) for t, p in procs.items()}
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=15)
    print(f"# Redis Cluster benchmark: {args.rounds} rounds, --requests {args.requests}, "
          f"{time.time() - started:.0f} s, commit {sh(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD']).strip()}")
    print()
    print("| load | test | target | requests/s | p50 µs | p99 µs | vs direct | proxy CPU µs/req |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, pipeline, _ in LOADS:
        load = (clients, pipeline)
        for test in TESTS:
            for t in targets:
                rows = results[(t, load)]
                med = lambda k: statistics.median(row[test][k] for row in rows)
                ratios = [row[test]["rps"] / d[test]["rps"] for row, d in zip(rows, results[("direct", load)])]
                c = statistics.median(cpu[(t, load)]) if (t, load) in cpu else None
                print(f"| -c {clients} -P {pipeline} | {test} | {t} | {med('rps'):.0f} | {med('p50'):.0f} | "
                      f"{med('p99'):.0f} | {statistics.median(ratios):.2f}x | "
                      f"{'' if c is None else f'{c:.1f}'} |")
    print()
    print("RSS after the load: " + ", ".join(f"{t} {v:.1f} MiB" for t, v in rss.items()))


if __name__ == "__main__":
    main()
