#!/usr/bin/env python3
"""A bounded-time soak of the release proxy: Redis and CQL load with client disconnects,
upstream restarts and config reloads, sampling the proxy's RSS, open file descriptors,
connections and error counts over time. Fails (exit 1) when RSS or file descriptors grow
by more than --tolerance after the warm-up.

    bench/soak.py [--minutes 30] [--sample-seconds 10] [--skip-build]

Not part of ./run-tests. What runs, all at once, against one proxy with two sources (a Redis
source whose RedisSinkSingle shares `connection_count: 2` connections, and a Cassandra
source with a CassandraSinkSingle):

  - redis-benchmark through the Redis source, in a loop, alternating `-c 50 -P 1`,
    `-c 50 -P 16` with random keys, and `-c 20 -k 0` (a new client connection per request:
    connect/disconnect churn);
  - CQL load from the Python driver (prepared INSERT and SELECT, 32 in flight), which drops
    its whole session and reconnects every 60 s;
  - Redis restarted (SHUTDOWN NOSAVE, then `e2e/services up redis`) every 5 minutes: the
    requests in flight then fail, and the proxy must serve again afterwards;
  - the topology rewritten every 45 s (a QueryCounter added to or removed from the Redis
    chain), which the proxy reloads in place.

Each sample records the proxy's RSS (VmRSS), open fds (/proc/PID/fd), client connections
(TCP sockets on its listening ports) and the failed-request and reload counters from
/metrics. Flat means: the mean of the last quarter of the samples is within --tolerance of
the mean of the first quarter after the warm-up (the first --warmup-minutes).
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import ROOT, free_port, rss_mib, services_env, sh, wait_port

OURS = os.path.join(ROOT, "target/release/shotover")


def topology(redis_port, cql_port, redis, cassandra, counted):
    counter = '        - QueryCounter:\n            name: "soak"\n' if counted else ""
    return f"""sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{redis_port}"
      chain:
{counter}        - RedisSinkSingle:
            remote_address: "{redis}"
            connect_timeout_ms: 3000
            connection_count: 2
  - Cassandra:
      name: "cql"
      listen_addr: "127.0.0.1:{cql_port}"
      chain:
        - CassandraSinkSingle:
            remote_address: "{cassandra}"
            connect_timeout_ms: 3000
"""


def metric_sum(obs, prefix):
    try:
        text = urllib.request.urlopen(f"http://{obs}/metrics", timeout=5).read().decode()
    except OSError:
        return float("nan")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sockets_on(pid, ports):
    """Established TCP connections of `pid` whose local port is one of `ports`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    count = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if fields[3] == "01" and local_port in ports and fields[9] in inodes:
                count += 1
    return count


def cassandra_driver():
    """The Python driver's Cluster and RoundRobinPolicy. (bench/cassandra/, latte's workload,
    would shadow the `cassandra` package: this script's folder leaves the path first.)"""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        from cassandra.cluster import Cluster
        from cassandra.policies import RoundRobinPolicy
    finally:
        sys.path[:] = saved
    return Cluster, RoundRobinPolicy


class Load:
    """Background load; counts the runs and failures it saw."""

    def __init__(self):
        self.stop = threading.Event()
        self.counts = {"redis runs": 0, "redis failed runs": 0, "cql ok": 0, "cql errors": 0,
                       "cql reconnects": 0}
        self.lock = threading.Lock()
        # (start, end, first error line) of each redis-benchmark run that saw an error.
        self.failures = []

    def bump(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def redis(self, port):
        loads = [["-c", "50", "-P", "1", "-n", "200000"],
                 ["-c", "50", "-P", "16", "-n", "1000000", "-r", "100000"],
                 ["-c", "20", "-k", "0", "-n", "20000"]]
        i = 0
        while not self.stop.is_set():
            cmd = ["redis-benchmark", "-p", str(port), "-t", "set,get", "-q", *loads[i % len(loads)]]
            i += 1
            started = time.time()
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            self.bump("redis runs")
            out = run.stdout + run.stderr
            if run.returncode != 0 or "rror" in out:
                # redis-benchmark stops at its first error reply.
                self.bump("redis failed runs")
                first = next((l for l in out.replace("\r", "\n").splitlines() if "rror" in l), "")
                with self.lock:
                    self.failures.append((started, time.time(), first.strip()[:160]))

    def cql(self, port):
        Cluster, RoundRobinPolicy = cassandra_driver()
        ks = "soak"
        while not self.stop.is_set():
            cluster = Cluster(["127.0.0.1"], port=port, load_balancing_policy=RoundRobinPolicy(),
                              protocol_version=4)
            try:
                session = cluster.connect()
                session.execute(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
                                "{'class': 'SimpleStrategy', 'replication_factor': 1}")
                session.execute(f"CREATE TABLE IF NOT EXISTS {ks}.t (k int PRIMARY KEY, v text)")
                insert = session.prepare(f"INSERT INTO {ks}.t (k, v) VALUES (?, ?)")
                select = session.prepare(f"SELECT v FROM {ks}.t WHERE k = ?")
                until = time.time() + 60
                n = 0
                while time.time() < until and not self.stop.is_set():
                    futures = []
                    for _ in range(16):
                        n += 1
                        futures.append(session.execute_async(insert, (n % 10000, f"v{n}")))
                        futures.append(session.execute_async(select, (n % 10000,)))
                    for f in futures:
                        try:
                            f.result()
                            self.bump("cql ok")
                        except Exception:
                            self.bump("cql errors")
            except Exception:
                self.bump("cql errors")
                time.sleep(1)
            finally:
                cluster.shutdown()
                self.bump("cql reconnects")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: a sixth of --minutes")
    ap.add_argument("--sample-seconds", type=float, default=10)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--restart-every", type=float, default=300, help="seconds between Redis restarts")
    ap.add_argument("--reload-every", type=float, default=45, help="seconds between topology rewrites")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    warmup = args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 6

    cassandra_driver()  # fails here, not in the load thread, when the driver is missing
    env = services_env("redis", "cassandra")
    redis, cassandra = env["REDIS_ADDR"], env["CASSANDRA_PLAIN_ADDR"]
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="shotover-soak-")
    redis_port, cql_port, obs_port = free_port(), free_port(), free_port()
    obs = f"127.0.0.1:{obs_port}"
    topo = os.path.join(tmp, "topology.yaml")
    conf = os.path.join(tmp, "config.yaml")
    counted = False
    with open(topo, "w") as f:
        f.write(topology(redis_port, cql_port, redis, cassandra, counted))
    with open(conf, "w") as f:
        f.write(f'main_log_level: "warn"\nobservability_interface: "{obs}"\n')
    log = open(os.path.join(tmp, "proxy.log"), "w")
    proxy = subprocess.Popen([OURS, "-t", topo, "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    wait_port(redis_port)
    wait_port(cql_port)
    load = Load()
    threads = [threading.Thread(target=load.redis, args=(redis_port,), daemon=True),
               threading.Thread(target=load.cql, args=(cql_port,), daemon=True)]
    for t in threads:
        t.start()
    start = time.time()
    end = start + args.minutes * 60
    next_restart, next_reload = start + args.restart_every, start + args.reload_every
    restarts = 0
    windows = []  # (Redis stopped, Redis up again) of each restart
    samples = []
    print(f"soak: {args.minutes} min, samples every {args.sample_seconds} s, warm-up {warmup:.1f} min, "
          f"proxy pid {proxy.pid}, logs in {tmp}", file=sys.stderr)
    try:
        while time.time() < end:
            time.sleep(args.sample_seconds)
            now = time.time()
            if proxy.poll() is not None:
                sys.exit(f"soak: the proxy exited with {proxy.returncode}; see {tmp}/proxy.log")
            if now >= next_reload:
                counted = not counted
                with open(topo, "w") as f:
                    f.write(topology(redis_port, cql_port, redis, cassandra, counted))
                next_reload = now + args.reload_every
            if now >= next_restart:
                down = time.time()
                subprocess.run(["redis-cli", "-p", redis.split(":")[1], "SHUTDOWN", "NOSAVE"],
                               capture_output=True)
                sh([os.path.join(ROOT, "e2e/services"), "up", "redis"])
                windows.append((down, time.time()))
                restarts += 1
                next_restart = now + args.restart_every
            fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
            sample = {
                "t": now - start,
                "rss": rss_mib(proxy.pid),
                "fds": fds,
                "conns": sockets_on(proxy.pid, {redis_port, cql_port}),
                "failed": metric_sum(obs, "shotover_failed_requests_count"),
                "reloads": metric_sum(obs, "shotover_config_reloads_count"),
            }
            samples.append(sample)
            print(f"t={sample['t']:6.0f}s rss={sample['rss']:6.1f} MiB fds={fds:5d} "
                  f"client conns={sample['conns']:4d} failed requests={sample['failed']:.0f} "
                  f"reloads={sample['reloads']:.0f} redis restarts={restarts} {load.counts}",
                  file=sys.stderr)
    finally:
        load.stop.set()
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proxy.kill()

    after = [s for s in samples if s["t"] >= warmup * 60]
    if len(after) < 8:
        sys.exit(f"soak: only {len(after)} samples after the warm-up; run longer")
    q = len(after) // 4
    first, last = after[:q], after[-q:]
    verdicts = []
    print()
    print(f"Soak of {args.minutes:g} min at commit `{sh(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD']).strip()}`, "
          f"{os.cpu_count()} cores, warm-up {warmup:g} min, {len(samples)} samples every {args.sample_seconds:g} s; "
          f"{restarts} Redis restarts, {samples[-1]['reloads']:.0f} reloads, "
          f"{load.counts['redis runs']} redis-benchmark runs ({load.counts['redis failed runs']} saw errors), "
          f"{load.counts['cql ok']:,} CQL requests answered ({load.counts['cql errors']} errors, "
          f"{load.counts['cql reconnects']} session reconnects), "
          f"{samples[-1]['failed']:.0f} requests failed by the proxy (upstream errors).")
    # A run that saw an error while Redis was down (or within 5 s after) failed because of
    # the restart; any other is a failure of the proxy.
    outside = [f for f in load.failures
               if not any(f[0] <= up + 5 and f[1] >= down for down, up in windows)]
    downtime = sum(up - down for down, up in windows)
    print()
    print(f"Redis was down {downtime:.1f} s in all; {len(load.failures) - len(outside)} of the runs that saw "
          f"errors overlapped a restart, {len(outside)} did not"
          + (f" (first: {outside[0][2]!r})" if outside else "") + ".")
    verdicts.append(not outside)
    print()
    print("| measure | first quarter after warm-up | last quarter | change | |")
    print("|---|---:|---:|---:|---|")
    for key, unit in (("rss", "MiB"), ("fds", "")):
        a = sum(s[key] for s in first) / len(first)
        b = sum(s[key] for s in last) / len(last)
        change = (b - a) / a if a else 0.0
        ok = change <= args.tolerance
        verdicts.append(ok)
        print(f"| {key} {unit} | {a:.1f} | {b:.1f} | {change:+.1%} | {'flat' if ok else 'GROWS'} |")
    conns = [s["conns"] for s in after]
    print(f"| client connections | min {min(conns)} | max {max(conns)} | | |")
    print()
    print(f"peak RSS {max(s['rss'] for s in samples):.1f} MiB, peak fds {max(s['fds'] for s in samples)}")
    if not all(verdicts):
        sys.exit(1)


if __name__ == "__main__":
    main()
