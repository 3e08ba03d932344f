#!/usr/bin/env python3
"""Cassandra direct vs through this proxy vs through upstream Shotover, in one run, on
loopback, driven by latte.

    bench/cassandra.py [--duration 15] [--skip-build] [--no-upstream]

Starts Cassandra through e2e/services, installs latte (a published CQL load tool, from
crates.io, into ~/.cache/shotover-bench/latte) the first time, builds and starts the release
proxy and upstream Shotover 0.7.4 (bench/upstream-shotover, built from crates.io as for
bench/redis.py) with the same passthrough topology (Cassandra source -> CassandraSinkSingle,
metrics on, nobody scraping), loads 100,000 rows, then runs latte's prepared `read` and
`write` (bench/cassandra/workload.rn) at 1 and 64 concurrent requests, each against
Cassandra directly and through both proxies, in two rounds of opposite orders (after a
warm-up of the node). Prints requests/s, p50 and p99 side by side, each proxy's ratio to
direct and ours to upstream's, the added p50, each proxy's CPU seconds per million
requests, and their RSS.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, cpu_seconds, free_port, rss_mib, services_env, wait_port

LATTE_VERSION = "0.29.0"
LATTE_ROOT = os.path.expanduser("~/.cache/shotover-bench/latte")
LATTE = os.path.join(LATTE_ROOT, "bin", "latte")
WORKLOAD = os.path.join(ROOT, "bench", "cassandra", "workload.rn")


def ensure_latte():
    if os.path.exists(LATTE):
        return
    print(f"installing latte-cli {LATTE_VERSION} from crates.io (first time only, ~10 min)", file=sys.stderr)
    subprocess.run(["cargo", "install", "--locked", "latte-cli", "--version", LATTE_VERSION,
                    "--root", LATTE_ROOT], check=True)


UPSTREAM_DIR = os.path.join(ROOT, "bench", "upstream-shotover")
UPSTREAM_BIN = os.path.join(UPSTREAM_DIR, "target", "release", "upstream-shotover")


def proxied_requests(obs_port):
    """Requests that entered our proxy's chain so far (warmups included), from /metrics."""
    with socket.create_connection(("127.0.0.1", obs_port), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith('shotover_chain_requests_batch_size_sum{chain="cql"}'):
            return float(line.split()[-1])
    return 0.0


def latte(args, cwd):
    return subprocess.run([LATTE, *args], cwd=cwd, check=True, text=True, capture_output=True)


def run(addr, function, concurrency, duration, workdir):
    """One latte run; returns ops/s, p50 and p99 in microseconds, and the request count."""
    report = os.path.join(workdir, f"{function}-{concurrency}-{addr.replace(':', '_')}.json")
    latte(["run", WORKLOAD, addr, "-f", function, "-p", str(concurrency), "-t", "1",
           "-d", f"{duration}s", "-w", "2s", "-q", "-o", report], workdir)
    with open(report) as f:
        data = json.load(f)
    result = data["result"]
    errors = result.get("error_count", 0)
    if errors:
        sys.exit(f"latte reported {errors} errors against {addr}: {result.get('errors')[:3]}")
    percentiles = [float(p) for p in data["percentiles"]]
    latency = result["request_latency"] or result["cycle_latency"]

    def at(p):
        # latte reports latencies in milliseconds
        return latency["percentiles"][percentiles.index(p)]["value"] * 1000

    return {
        "rps": result["req_throughput"]["value"],
        "p50": at(50.0),
        "p99": at(99.0),
        "requests": result["request_count"],
    }


def mean(results):
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def start_proxy(key, binary, tmp, direct, extra_args):
    """Starts a proxy with the passthrough topology; returns (process, port, obs_port)."""
    port, obs_port = free_port(), free_port()
    topology = os.path.join(tmp, f"{key}-topology.yaml")
    config = os.path.join(tmp, f"{key}-config.yaml")
    with open(topology, "w") as f:
        f.write(f"""sources:
  - Cassandra:
      name: "cql"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - CassandraSinkSingle:
            remote_address: "{direct}"
            connect_timeout_ms: 3000
""")
    with open(config, "w") as f:
        f.write(f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs_port}"\n')
    proc = subprocess.Popen([binary, "-t", topology, "-c", config, *extra_args])
    wait_port(port)
    return proc, port, obs_port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15, help="seconds per measured run")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-upstream", action="store_true", help="leave upstream Shotover out")
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra argument for our shotover (repeatable)")
    args = ap.parse_args()

    env = services_env("cassandra")
    direct = env["CASSANDRA_PLAIN_ADDR"]
    ensure_latte()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
        if not args.no_upstream:
            print("building upstream Shotover 0.7.4 (minutes the first time)", file=sys.stderr)
            subprocess.run(["cargo", "build", "--release", "--locked", "--target-dir",
                            os.path.join(UPSTREAM_DIR, "target")], cwd=UPSTREAM_DIR, check=True)
    if not args.no_upstream and not os.access(UPSTREAM_BIN, os.X_OK):
        sys.exit(f"{UPSTREAM_BIN} is missing (drop --skip-build, or pass --no-upstream)")
    tmp = tempfile.mkdtemp(prefix="shotover-bench-cql-")
    paths = ["direct", "ours"] + ([] if args.no_upstream else ["upstream"])
    procs, addrs, obs = {}, {"direct": direct}, {}
    try:
        procs["ours"], port, obs["ours"] = start_proxy(
            "ours", os.path.join(ROOT, "target/release/shotover"), tmp, direct, args.proxy_arg)
        addrs["ours"] = f"127.0.0.1:{port}"
        if "upstream" in paths:
            procs["upstream"], port, obs["upstream"] = start_proxy("upstream", UPSTREAM_BIN, tmp, direct, [])
            addrs["upstream"] = f"127.0.0.1:{port}"
        time.sleep(0.5)
        rss_idle = {k: rss_mib(p.pid) for k, p in procs.items()}
        latte(["schema", WORKLOAD, direct], tmp)
        latte(["load", WORKLOAD, direct, "-q"], tmp)
        # Warm the node (JIT, caches) on both operations before measuring anything.
        for function in ("read", "write"):
            run(direct, function, 64, 10, tmp)
        # Our proxy counts its requests in /metrics; upstream's CPU is divided by the
        # requests latte made through it (warm-ups included, as latte counts them).
        rows = []
        for concurrency in (1, 64):
            for function in ("read", "write"):
                # Two rounds in opposite orders, so that a drift of the node's speed during
                # the run weighs on every path alike; each figure is the mean of its runs.
                runs = {k: [] for k in paths}
                cpu = {k: 0.0 for k in procs}
                n = {k: 0.0 for k in procs}
                for order in (paths, paths[::-1]):
                    for key in order:
                        if key in procs:
                            cpu0 = cpu_seconds(procs[key].pid)
                            n0 = proxied_requests(obs["ours"]) if key == "ours" else 0
                        result = run(addrs[key], function, concurrency, args.duration, tmp)
                        runs[key].append(result)
                        if key in procs:
                            cpu[key] += cpu_seconds(procs[key].pid) - cpu0
                            if key == "ours":
                                n[key] += proxied_requests(obs["ours"]) - n0
                            else:
                                # latte's count covers the measured part; add the warm-up's
                                # share at the same rate.
                                n[key] += result["requests"] * (args.duration + 2) / args.duration
                means = {k: mean(v) for k, v in runs.items()}
                per_m = {k: cpu[k] / max(n[k], 1) * 1e6 for k in procs}
                rows.append((concurrency, function, means, per_m))
        rss_after = {k: rss_mib(p.pid) for k, p in procs.items()}
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)

    labels = {"direct": "direct", "ours": "this proxy", "upstream": "upstream 0.7.4"}
    print()
    print(f"latte {LATTE_VERSION}, prepared statements, 1 thread, 1 connection, 2 runs of {args.duration} s "
          f"(+2 s warmup) per path and load, Cassandra {env.get('CASSANDRA_VERSION', '?')} on {direct}, "
          f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")
    print("| in flight | op | path | req/s | vs direct | p50 µs | added p50 µs | p99 µs | proxy CPU s / 1M req |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for concurrency, function, means, per_m in rows:
        d = means["direct"]
        for key in paths:
            m = means[key]
            cpu = f"{per_m[key]:.1f}" if key in per_m else ""
            added = "" if key == "direct" else f"{m['p50'] - d['p50']:+.0f}"
            print(f"| {concurrency} | {function} | {labels[key]} | {m['rps']:,.0f} | {m['rps'] / d['rps']:.2f}x "
                  f"| {m['p50']:.0f} | {added} | {m['p99']:.0f} | {cpu} |")
    if "upstream" in paths:
        print()
        print("| in flight | op | this proxy / upstream (req/s) |")
        print("|---:|---|---:|")
        for concurrency, function, means, _ in rows:
            print(f"| {concurrency} | {function} | {means['ours']['rps'] / means['upstream']['rps']:.2f}x |")
    print()
    for key in procs:
        print(f"{labels[key]} RSS: idle {rss_idle[key]:.1f} MiB, after all runs {rss_after[key]:.1f} MiB")


if __name__ == "__main__":
    main()
