#!/usr/bin/env python3
"""Redis direct vs this proxy (two modes) vs upstream Shotover vs twemproxy, in one run, on loopback.

    bench/redis.py [--rounds 3] [--requests 200000] [--soak-rounds 2] [--skip-build]

Targets, all in front of the same Redis (started through e2e/services) and each on its own
free loopback port:

  direct     Redis itself
  dedicated  this proxy, a Redis source with one RedisSinkSingle (one upstream connection per
             client connection, upstream Shotover's model), metrics on and never scraped
  shared     the same topology with `connection_count: 2` under the RedisSinkSingle
  dedicated-tpc, shared-tpc
             the same two with `--thread-per-core` (one single-threaded runtime per core,
             each client connection and the shared connections it uses on one thread; in
             shared-tpc each thread has its own 2 connections)
  upstream   upstream Shotover 0.7.4 from crates.io (bench/upstream-shotover), a Valkey source
             with one ValkeySinkSingle, metrics on and never scraped
  twemproxy  Debian's nutcracker (installed through apt-get when missing), one pool with one
             server and `server_connections: 1`

Loads: redis-benchmark `-t set,get` at `-c 50 -P 1 -n R`, `-c 50 -P 16 -n 5R`,
`-c 1 -P 1 -n R/4` and `-c 500 -P 1 -n R`, R = --requests (see LOADS). Rounds are
interleaved: each round runs every load against every target once (the target order
rotates from round to round), so the drift of a shared machine hits all targets alike.
Reported: the median over rounds of requests/s, p50 and p99, the median of each round's
ratio to direct, the proxy's CPU time per request (user+system of the proxy process over
the SET and GET runs of a load, divided by their requests) and Redis's own CPU per request
in the same runs; each proxy's RSS idle, with 200 idle client connections
(each has sent one PING), after all the load, and its peak (VmHWM). Then the soak: RSS of our
two modes after each of --soak-rounds rounds of 2M random-key requests.

Builds: `cargo build --release --locked -p shotover` in the workspace and `cargo build
--release --locked` in bench/upstream-shotover (its own workspace, Cargo.lock and target
dir), both skipped with --skip-build. Upstream 0.7.4 builds with Rust 1.95 and needs no
system package beyond a C compiler (aws-lc-sys and ring compile C with cc; cmake is not
needed), all present on the Debian image; the first build takes several minutes (fat LTO,
one codegen unit, as upstream's release profile).

A whole default run (3 rounds, --requests 200000, 2 soak rounds, builds up to date) takes
about 13 minutes on 2 cores (one round measured at 4 minutes, the soak under a minute).
Redis is the shared e2e/services one: anything else using it meanwhile (tests) skews the
figures, Redis's CPU per request most.
"""
import argparse
import csv
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, cpu_seconds, free_port, proc_status_mib, rss_mib, services_env, sh

BENCH = os.path.dirname(os.path.abspath(__file__))
UPSTREAM_DIR = os.path.join(BENCH, "upstream-shotover")
UPSTREAM_BIN = os.path.join(UPSTREAM_DIR, "target/release/upstream-shotover")
OURS_BIN = os.path.join(ROOT, "target/release/shotover")
UPSTREAM_VERSION = "0.7.4"

# (clients, pipeline, share of --requests). The shares keep every test long enough to mean
# something and the whole run near 13 minutes on 2 cores: `-P 16` runs ~15x faster than
# `-P 1` so it gets 5x the requests, and `-c 1` (latency-bound, ~8k rps here) a quarter.
# With 1 everywhere, 3 rounds of 200000 took ~22 minutes, three quarters of it in `-c 1`.
LOADS = [(50, 1, 1), (50, 16, 5), (1, 1, 0.25), (500, 1, 1)]
TESTS = ("SET", "GET")
ALL_TARGETS = ("direct", "dedicated", "shared", "dedicated-tpc", "shared-tpc", "upstream", "twemproxy")
OURS = ("dedicated", "shared", "dedicated-tpc", "shared-tpc")
LABELS = {
    "direct": "direct Redis",
    "dedicated": "ours, dedicated",
    "shared": "ours, shared (`connection_count: 2`)",
    "dedicated-tpc": "ours, dedicated, `--thread-per-core`",
    "shared-tpc": "ours, shared, `--thread-per-core`",
    "upstream": f"upstream Shotover {UPSTREAM_VERSION}",
    "twemproxy": "twemproxy",
}
BENCH_TIMEOUT = 900  # seconds for one redis-benchmark run: a wedged proxy fails the run, not hangs it


def log(msg):
    print(f"bench/redis.py: {msg}", file=sys.stderr, flush=True)


def redis_benchmark(port, clients, pipeline, requests):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
           "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "--csv"]
    try:
        out = sh(cmd, timeout=BENCH_TIMEOUT)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed with {e.returncode}: {e.stdout}{e.stderr}") from None
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"]] = {
            "rps": float(row["rps"]),
            "p50": float(row["p50_latency_ms"]) * 1000,
            "p99": float(row["p99_latency_ms"]) * 1000,
        }
    missing = [t for t in TESTS if t not in rows]
    if missing:
        raise RuntimeError(f"redis-benchmark on port {port} reported no {missing}: {out!r}")
    return rows


def as_root(cmd):
    if os.geteuid() == 0:
        return cmd
    if shutil.which("sudo"):
        return ["sudo", *cmd]
    sys.exit(f"need root to run: {' '.join(cmd)}")


def ensure_nutcracker():
    """Installs Debian's nutcracker (twemproxy) when missing, as e2e/services installs its packages."""
    if shutil.which("nutcracker"):
        return
    log("installing nutcracker (twemproxy) from Debian")
    subprocess.run(as_root(["apt-get", "update", "-qq"]), check=True, stdout=sys.stderr)
    # The package's postinst may try to start a nutcracker service from the (empty) example
    # configuration; this script never uses that one, it starts its own in the foreground.
    subprocess.run(as_root(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
                            "nutcracker"]), check=True, stdout=sys.stderr)
    if not shutil.which("nutcracker"):
        sys.exit("apt-get installed nutcracker but there is no nutcracker on PATH")


def git_commit():
    try:
        commit = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
        dirty = sh(["git", "status", "--porcelain"], cwd=ROOT).strip()
        return commit + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def first_line(cmd):
    try:
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=10)
        return (p.stdout.strip() or p.stderr.strip()).splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def redis_pid(port):
    for line in sh(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "info", "server"]).splitlines():
        if line.startswith("process_id:"):
            pid = int(line.split(":", 1)[1])
            # Only if it is a process of this machine's /proc (not in another PID namespace).
            return pid if os.path.exists(f"/proc/{pid}/stat") else None
    return None


def read_reply_line(s):
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(64)
        if not chunk:
            break
        buf += chunk
    return buf


class Target:
    def __init__(self, key, port, pid=None, proc=None, logfile=None):
        self.key, self.port, self.pid, self.proc, self.logfile = key, port, pid, proc, logfile
        self.rss = {}

    @property
    def label(self):
        return LABELS[self.key]

    def log_tail(self, lines=20):
        if not self.logfile or not os.path.exists(self.logfile):
            return ""
        with open(self.logfile, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait_listening(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.key} exited with {self.proc.returncode} before listening on "
                                   f"{self.port}; its log ({self.logfile}):\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.key}: nothing listens on {self.port} after {timeout}s; "
                           f"its log ({self.logfile}):\n{self.log_tail()}")

    def check_proxies(self, redis_port):
        """SET through the target, GET from Redis directly: it proxies to that very Redis."""
        key, value = f"bench:check:{self.key}", f"{self.key}-{os.getpid()}"
        reply = sh(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "set", key, value]).strip()
        got = sh(["redis-cli", "-h", "127.0.0.1", "-p", str(redis_port), "get", key]).strip()
        if reply != "OK" or got != value:
            raise RuntimeError(f"{self.key} on {self.port} does not proxy to Redis on {redis_port}: "
                               f"SET replied {reply!r}, Redis has {got!r}")

    def measure_idle_rss(self):
        time.sleep(0.3)
        self.rss["idle"] = rss_mib(self.pid)
        idle = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", self.port))
                s.sendall(b"*1\r\n$4\r\nPING\r\n")  # RESP array: twemproxy takes no inline commands
                idle.append(s)
            for s in idle:
                reply = read_reply_line(s)
                if reply != b"+PONG\r\n":
                    raise RuntimeError(f"{self.key} answered PING with {reply!r}")
            time.sleep(0.3)
            self.rss["200 idle"] = rss_mib(self.pid)
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.key} (pid {self.proc.pid}) ignored SIGTERM for 15 s, killing it")
            self.proc.kill()
            self.proc.wait(timeout=15)


def start(key, cmd, port, tmp):
    logfile = os.path.join(tmp, f"{key}.log")
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Target(key, port, pid=proc.pid, proc=proc, logfile=logfile)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def start_ours(key, tmp, redis_port, extra_sink_yaml, proxy_args, binary):
    port, obs_port = free_port(), free_port()
    topo = write(os.path.join(tmp, f"{key}-topology.yaml"), f"""sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - RedisSinkSingle:
            remote_address: "127.0.0.1:{redis_port}"
            connect_timeout_ms: 3000
{extra_sink_yaml}""")
    conf = write(os.path.join(tmp, f"{key}-config.yaml"),
                 f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs_port}"\n')
    return start(key, [binary, "-t", topo, "-c", conf, *proxy_args], port, tmp)


def start_upstream(tmp, redis_port):
    port, obs_port = free_port(), free_port()
    topo = write(os.path.join(tmp, "upstream-topology.yaml"), f"""sources:
  - Valkey:
      name: "valkey"
      listen_addr: "127.0.0.1:{port}"
      chain:
        - ValkeySinkSingle:
            remote_address: "127.0.0.1:{redis_port}"
            connect_timeout_ms: 3000
""")
    conf = write(os.path.join(tmp, "upstream-config.yaml"),
                 f'main_log_level: "warn"\nobservability_interface: "127.0.0.1:{obs_port}"\n')
    return start("upstream", [UPSTREAM_BIN, "-t", topo, "-c", conf], port, tmp)


def start_twemproxy(tmp, redis_port):
    port, stats_port = free_port(), free_port()
    conf = write(os.path.join(tmp, "twemproxy.yml"), f"""bench:
  listen: 127.0.0.1:{port}
  redis: true
  servers:
   - 127.0.0.1:{redis_port}:1
  server_connections: 1
""")
    test = subprocess.run(["nutcracker", "-t", "-c", conf], text=True, capture_output=True)
    if test.returncode != 0:
        raise RuntimeError(f"nutcracker rejects {conf}: {test.stdout}{test.stderr}")
    # Foreground (no -d); the log, stats listener and pid file stay in the temporary directory.
    return start("twemproxy", ["nutcracker", "-c", conf, "-s", str(stats_port), "-a", "127.0.0.1",
                               "-o", os.path.join(tmp, "twemproxy.log"),
                               "-p", os.path.join(tmp, "twemproxy.pid")], port, tmp)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def load_requests(requests, share):
    return max(1, round(requests * share))


def load_name(clients, pipeline):
    return f"-c {clients} -P {pipeline}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000, help="-n of each redis-benchmark test")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are over these")
    ap.add_argument("--skip-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--soak-rounds", type=int, default=2,
                    help="rounds of 2M random-key requests (-c 50 -P 16) against our two modes after "
                         "the table, RSS sampled after each")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated subset of {','.join(ALL_TARGETS)} (direct is always run)")
    ap.add_argument("--shotover-bin", default=OURS_BIN, help="our proxy's binary (default %(default)s)")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra argument for our shotover, both modes (repeatable)")
    args = ap.parse_args()
    wanted = ["direct"] + [t for t in args.targets.split(",") if t and t != "direct"]
    unknown = [t for t in wanted if t not in ALL_TARGETS]
    if unknown:
        sys.exit(f"unknown target(s) {unknown}; known: {', '.join(ALL_TARGETS)}")
    wanted = [t for t in ALL_TARGETS if t in wanted]
    started_at = time.time()

    env = services_env("redis")
    redis_port = int(env["REDIS_ADDR"].rsplit(":", 1)[1])
    rpid = redis_pid(redis_port)
    if "twemproxy" in wanted:
        ensure_nutcracker()
    if not args.skip_build:
        if any(k in wanted for k in OURS):
            subprocess.run(["cargo", "build", "--release", "--locked", "-p", "shotover"], cwd=ROOT, check=True)
        if "upstream" in wanted:
            log(f"building upstream Shotover {UPSTREAM_VERSION} in {UPSTREAM_DIR} (minutes the first time)")
            subprocess.run(["cargo", "build", "--release", "--locked",
                            "--target-dir", os.path.join(UPSTREAM_DIR, "target")], cwd=UPSTREAM_DIR, check=True)
    for key, binary in [*((k, args.shotover_bin) for k in OURS), ("upstream", UPSTREAM_BIN)]:
        if key in wanted and not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing (drop --skip-build, or leave {key} out with --targets)")

    tmp = tempfile.mkdtemp(prefix="shotover-bench-")
    log(f"configurations and logs of the proxies in {tmp}")
    targets = {"direct": Target("direct", redis_port, pid=rpid)}
    proxies = []
    results = {}  # (load, key) -> list of per-round dicts
    soak = {}
    try:
        for key in wanted:
            if key == "direct":
                continue
            if key in OURS:
                sink = "            connection_count: 2\n" if key.startswith("shared") else ""
                extra = ["--thread-per-core"] if key.endswith("-tpc") else []
                t = start_ours(key, tmp, redis_port, sink, [*args.proxy_arg, *extra], args.shotover_bin)
            elif key == "upstream":
                t = start_upstream(tmp, redis_port)
            else:
                t = start_twemproxy(tmp, redis_port)
            proxies.append(t)
            targets[key] = t
            t.wait_listening()
            t.check_proxies(redis_port)
        for t in proxies:  # one at a time, the others idle
            t.measure_idle_rss()
            log(f"{t.key}: RSS idle {t.rss['idle']:.1f} MiB, with 200 idle connections {t.rss['200 idle']:.1f} MiB")

        order = list(wanted)
        for rnd in range(args.rounds):
            for clients, pipeline, share in LOADS:
                load = load_name(clients, pipeline)
                n = load_requests(args.requests, share)
                for key in order:
                    t = targets[key]
                    redis_before = cpu_seconds(rpid) if rpid else None
                    before = cpu_seconds(t.pid) if t.proc else None
                    rows = redis_benchmark(t.port, clients, pipeline, n)
                    r = {test: rows[test] for test in TESTS}
                    if t.proc:
                        if t.proc.poll() is not None:
                            raise RuntimeError(f"{key} exited during `{load}`: {t.log_tail()}")
                        r["proxy_cpu_us"] = (cpu_seconds(t.pid) - before) / (len(TESTS) * n) * 1e6
                    if rpid:
                        r["redis_cpu_us"] = (cpu_seconds(rpid) - redis_before) / (len(TESTS) * n) * 1e6
                    results.setdefault((load, key), []).append(r)
                    log(f"round {rnd + 1}/{args.rounds} `{load}` {key}: "
                        + ", ".join(f"{test} {r[test]['rps']:,.0f} rps p50 {r[test]['p50']:.0f} µs" for test in TESTS)
                        + (f", proxy {r['proxy_cpu_us']:.1f} µs CPU/req" if "proxy_cpu_us" in r else ""))
            order = order[1:] + order[:1]
            log(f"round {rnd + 1} done, {time.time() - started_at:.0f} s since start")
        for t in proxies:
            t.rss["after load"] = rss_mib(t.pid)
            t.rss["peak"] = proc_status_mib(t.pid, "VmHWM")

        # Sustained load, metrics on and never scraped: RSS must stay flat.
        for key in OURS:
            if key not in targets:
                continue
            t = targets[key]
            for _ in range(args.soak_rounds):
                sh(["redis-benchmark", "-h", "127.0.0.1", "-p", str(t.port), "-t", "set,get",
                    "-n", "1000000", "-c", "50", "-P", "16", "-r", "1000000", "-q"], timeout=BENCH_TIMEOUT)
                soak.setdefault(key, []).append(rss_mib(t.pid))
            if args.soak_rounds:
                log(f"soak {key}: " + ", ".join(f"{x:.1f}" for x in soak[key]) + " MiB")
    finally:
        for t in proxies:
            try:
                t.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {t.key}: {e}")

    report(args, wanted, targets, proxies, results, soak, redis_port, time.time() - started_at)


def ratio_medians(results, load, num, den, test):
    """Median over rounds of that round's num/den requests/s (same round, so same drift)."""
    a, b = results.get((load, num)), results.get((load, den))
    if not a or not b:
        return float("nan")
    return median([x[test]["rps"] / y[test]["rps"] for x, y in zip(a, b)])


def report(args, wanted, targets, proxies, results, soak, redis_port, elapsed):
    redis_version = sh(["redis-server", "--version"]).split()[2].removeprefix("v=")
    bench_version = first_line(["redis-benchmark", "--version"])
    versions = [f"Redis {redis_version}", bench_version]
    if "twemproxy" in wanted:
        versions.append(first_line(["nutcracker", "-V"]).removeprefix("This is ").replace("-", " "))
    if "upstream" in wanted:
        versions.append(f"upstream Shotover {first_line([UPSTREAM_BIN, '--version']).split()[-1]} (crates.io "
                        f"`shotover = \"={UPSTREAM_VERSION}\"`, fat LTO)")
    print()
    print(f"Run of {time.strftime('%Y-%m-%d')} at commit `{git_commit()}`, {os.cpu_count()} cores, "
          f"{', '.join(versions)}; everything on loopback and sharing the same cores. "
          f"redis-benchmark `-t set,get` (`-n` per load below, `--requests {args.requests}`), "
          f"{args.rounds} interleaved rounds, medians "
          f"over rounds; the run took {elapsed / 60:.1f} min.")
    print()
    print("| load | target | SET rps | GET rps | SET vs direct | GET vs direct | SET p50 µs | GET p50 µs "
          "| SET p99 µs | GET p99 µs | proxy CPU µs / req | Redis CPU µs / req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, pipeline, share in LOADS:
        load = load_name(clients, pipeline)
        cell = f"{load} -n {load_requests(args.requests, share)}"
        for key in wanted:
            rs = results.get((load, key))
            if not rs:
                continue
            m = {test: {f: median([r[test][f] for r in rs]) for f in ("rps", "p50", "p99")} for test in TESTS}
            vs = ["—" if key == "direct" else f"{ratio_medians(results, load, key, 'direct', test):.2f}x"
                  for test in TESTS]
            pcpu = "—" if key == "direct" else f"{median([r['proxy_cpu_us'] for r in rs]):.1f}"
            rcpu = f"{median([r['redis_cpu_us'] for r in rs]):.1f}" if "redis_cpu_us" in rs[0] else "?"
            print(f"| `{cell}` | {LABELS[key]} | {m['SET']['rps']:,.0f} | {m['GET']['rps']:,.0f} | {vs[0]} | {vs[1]} "
                  f"| {m['SET']['p50']:.0f} | {m['GET']['p50']:.0f} | {m['SET']['p99']:.0f} | {m['GET']['p99']:.0f} "
                  f"| {pcpu} | {rcpu} |")
    print()
    print("| proxy | RSS idle MiB | with 200 idle connections MiB | after all the load MiB | peak (VmHWM) MiB |")
    print("|---|---:|---:|---:|---:|")
    for t in proxies:
        print(f"| {t.label} | {t.rss.get('idle', float('nan')):.1f} | {t.rss.get('200 idle', float('nan')):.1f} "
              f"| {t.rss.get('after load', float('nan')):.1f} | {t.rss.get('peak', float('nan')):.1f} |")
    print()
    for key, rss in soak.items():
        print(f"{LABELS[key]}: RSS after each of {len(rss)} rounds of 2M more requests (random keys, "
              f"-c 50 -P 16): " + ", ".join(f"{r:.1f}" for r in rss) + " MiB")
    if soak:
        print()
    for clients, pipeline, _ in LOADS:
        load = load_name(clients, pipeline)
        parts = [f"ours {num} / {den} {ratio_medians(results, load, num, den, 'SET'):.2f}x SET, "
                 f"{ratio_medians(results, load, num, den, 'GET'):.2f}x GET"
                 for num, den in (("shared", "twemproxy"), ("shared-tpc", "twemproxy"), ("dedicated", "upstream"),
                                  ("dedicated-tpc", "upstream"))
                 if num in wanted and den in wanted]
        if parts:
            print(f"- `{load}`: " + "; ".join(parts) + " (throughput)")
    print()
    print("(Ratios are medians over rounds of each round's ratio, both sides measured in the same round. "
          "CPU per request is the process's user+system time over both tests of a load, divided by their "
          "requests; 1 µs per request = 1 CPU second per million requests. Redis CPU is redis-server's own, "
          f"pid {targets['direct'].pid}, in the same runs. Proxies' RSS is /proc VmRSS; 200 idle connections "
          "have each sent one PING.)")


if __name__ == "__main__":
    main()
