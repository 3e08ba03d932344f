#!/usr/bin/env python3
"""Redis direct vs through shotover, in one run, on loopback.

    bench/redis.py [--requests 500000] [--skip-build]

Starts Redis through e2e/services, builds and starts the release proxy with a passthrough
topology (metrics on, nobody scraping), then runs redis-benchmark `-t set,get` at
`-c 50 -P 1`, `-c 50 -P 16` and `-c 1 -P 1` against Redis directly and through the proxy.
Prints requests/s, p50 and p99 side by side, the proxy/direct ratio, the proxy's CPU
seconds per million requests, and its RSS idle, with 200 idle client connections, and
before/after all the load.
"""
import argparse
import csv
import io
import os
import socket
import subprocess
import tempfile
import time

from common import ROOT, cpu_seconds, free_port, rss_mib, services_env, sh, wait_port


def redis_benchmark(port, clients, pipeline, requests):
    out = sh(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
              "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "--csv"])
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"]] = {
            "rps": float(row["rps"]),
            "p50": float(row["p50_latency_ms"]) * 1000,
            "p99": float(row["p99_latency_ms"]) * 1000,
        }
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500_000)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--soak-rounds", type=int, default=5,
                    help="rounds of 2M random-key requests after the table, RSS sampled after each")
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra argument for shotover (repeatable)")
    args = ap.parse_args()

    env = services_env("redis")
    redis_port = int(env["REDIS_ADDR"].rsplit(":", 1)[1])
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
    proxy_port, obs_port = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="shotover-bench-")
    with open(os.path.join(tmp, "topology.yaml"), "w") as f:
        f.write(f"""sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{proxy_port}"
      chain:
        - RedisSinkSingle:
            remote_address: "127.0.0.1:{redis_port}"
            connect_timeout_ms: 3000
""")
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs_port}"\n')
    proxy = subprocess.Popen([os.path.join(ROOT, "target/release/shotover"),
                              "-t", os.path.join(tmp, "topology.yaml"),
                              "-c", os.path.join(tmp, "config.yaml"), *args.proxy_arg])
    try:
        wait_port(proxy_port)
        time.sleep(0.2)
        rss_idle = rss_mib(proxy.pid)
        idle = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", proxy_port))
            s.sendall(b"PING\r\n")
            idle.append(s)
        for s in idle:
            assert s.recv(16) == b"+PONG\r\n"
        time.sleep(0.2)
        rss_200 = rss_mib(proxy.pid)
        for s in idle:
            s.close()

        results = []
        for clients, pipeline in [(50, 1), (50, 16), (1, 1)]:
            n = args.requests
            direct = redis_benchmark(redis_port, clients, pipeline, n)
            before = cpu_seconds(proxy.pid)
            proxied = redis_benchmark(proxy_port, clients, pipeline, n)
            cpu = cpu_seconds(proxy.pid) - before
            for test in ("SET", "GET"):
                d, p = direct[test], proxied[test]
                results.append((f"-c {clients} -P {pipeline}", test, d, p, cpu / (2 * n) * 1e6))
        rss_after = rss_mib(proxy.pid)
        # Sustained load, metrics on and never scraped: RSS must stay flat.
        soak = []
        for _ in range(args.soak_rounds):
            sh(["redis-benchmark", "-h", "127.0.0.1", "-p", str(proxy_port), "-t", "set,get",
                "-n", "1000000", "-c", "50", "-P", "16", "-r", "1000000", "-q"])
            soak.append(rss_mib(proxy.pid))
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)

    print()
    print(f"redis-benchmark -t set,get -n {args.requests}, Redis {sh(['redis-server', '--version']).split()[2]}, "
          f"{os.cpu_count()} cores, direct and proxied in the same run")
    print()
    print("| load | test | direct rps | proxied rps | ratio | direct p50 µs | proxied p50 µs | added p50 µs "
          "| direct p99 µs | proxied p99 µs | proxy CPU s / 1M req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for load, test, d, p, cpu_us in results:
        print(f"| `{load}` | {test} | {d['rps']:,.0f} | {p['rps']:,.0f} | {p['rps'] / d['rps']:.2f}x "
              f"| {d['p50']:.0f} | {p['p50']:.0f} | {p['p50'] - d['p50']:+.0f} | {d['p99']:.0f} | {p['p99']:.0f} "
              f"| {cpu_us:.1f} |")
    print()
    print(f"proxy RSS: idle {rss_idle:.1f} MiB, with 200 idle connections {rss_200:.1f} MiB, "
          f"after all the load above (metrics on, never scraped) {rss_after:.1f} MiB")
    print(f"proxy RSS after each of {len(soak)} rounds of 2M more requests (random keys, -c 50 -P 16): "
          + ", ".join(f"{r:.1f}" for r in soak) + " MiB")
    print("(CPU per request is the proxy's user+system time over both tests of a load, divided by their requests;"
          " 1 µs per request = 1 CPU second per million requests)")


if __name__ == "__main__":
    main()
