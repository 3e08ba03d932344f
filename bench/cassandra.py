#!/usr/bin/env python3
"""Cassandra direct vs through shotover, in one run, on loopback, driven by latte.

    bench/cassandra.py [--duration 15] [--skip-build]

Starts Cassandra through e2e/services, installs latte (a published CQL load tool, from
crates.io, into ~/.cache/shotover-bench/latte) the first time, builds and starts the release
proxy with a passthrough topology (Cassandra source -> CassandraSinkSingle, metrics on,
nobody scraping), loads 100,000 rows, then runs latte's prepared `read` and `write`
(bench/cassandra/workload.rn) at 1 and 64 concurrent requests, each against Cassandra
directly and through the proxy, twice in opposite orders (after a warm-up of the node). Prints requests/s, p50 and p99 side by
side, the proxy/direct ratio, the added p50, the proxy's CPU seconds per million requests,
and its RSS.
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


def proxied_requests(obs_port):
    """Requests that entered the proxy's chain so far (warmups included), from /metrics."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15, help="seconds per measured run")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra argument for shotover (repeatable)")
    args = ap.parse_args()

    env = services_env("cassandra")
    direct = env["CASSANDRA_PLAIN_ADDR"]
    ensure_latte()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
    proxy_port, obs_port = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="shotover-bench-cql-")
    with open(os.path.join(tmp, "topology.yaml"), "w") as f:
        f.write(f"""sources:
  - Cassandra:
      name: "cql"
      listen_addr: "127.0.0.1:{proxy_port}"
      chain:
        - CassandraSinkSingle:
            remote_address: "{direct}"
            connect_timeout_ms: 3000
""")
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs_port}"\n')
    proxy = subprocess.Popen([os.path.join(ROOT, "target/release/shotover"),
                              "-t", os.path.join(tmp, "topology.yaml"),
                              "-c", os.path.join(tmp, "config.yaml"), *args.proxy_arg])
    proxied = f"127.0.0.1:{proxy_port}"
    try:
        wait_port(proxy_port)
        time.sleep(0.2)
        rss_idle = rss_mib(proxy.pid)
        latte(["schema", WORKLOAD, direct], tmp)
        latte(["load", WORKLOAD, direct, "-q"], tmp)
        # Warm the node (JIT, caches) on both operations before measuring anything.
        for function in ("read", "write"):
            run(direct, function, 64, 10, tmp)
        rows = []
        for concurrency in (1, 64):
            for function in ("read", "write"):
                # Two rounds in opposite orders, so that a drift of the node's speed during
                # the run weighs on both paths alike; each figure is the mean of its two runs.
                runs = {direct: [], proxied: []}
                cpu = n = 0.0
                for order in ((direct, proxied), (proxied, direct)):
                    for addr in order:
                        cpu0, n0 = cpu_seconds(proxy.pid), proxied_requests(obs_port)
                        runs[addr].append(run(addr, function, concurrency, args.duration, tmp))
                        if addr == proxied:
                            cpu += cpu_seconds(proxy.pid) - cpu0
                            n += proxied_requests(obs_port) - n0
                d, p = (mean(runs[direct]), mean(runs[proxied]))
                rows.append((concurrency, function, d, p, cpu / max(n, 1) * 1e6))
        rss_after = rss_mib(proxy.pid)
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)

    print()
    print(f"latte {LATTE_VERSION}, prepared statements, 1 thread, 1 connection, 2 runs of {args.duration} s "
          f"(+2 s warmup) per path and load, Cassandra {env.get('CASSANDRA_VERSION', '?')} on {direct}")
    print("| concurrency | op | direct req/s | proxied req/s | ratio | direct p50 µs | proxied p50 µs "
          "| added p50 µs | direct p99 µs | proxied p99 µs | proxy CPU s / 1M req |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency, function, d, p, cpu in rows:
        print(f"| {concurrency} | {function} | {d['rps']:,.0f} | {p['rps']:,.0f} | {p['rps'] / d['rps']:.2f}x "
              f"| {d['p50']:.0f} | {p['p50']:.0f} | {p['p50'] - d['p50']:+.0f} | {d['p99']:.0f} | {p['p99']:.0f} "
              f"| {cpu:.1f} |")
    print()
    print(f"proxy RSS: idle {rss_idle:.1f} MiB, after all runs {rss_after:.1f} MiB")


if __name__ == "__main__":
    main()
