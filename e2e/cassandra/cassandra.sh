#!/usr/bin/env bash
# A real single-node Apache Cassandra 5.0 for the end-to-end tests, built only from Maven Central jars.
#
#   e2e/cassandra/cassandra.sh up [--auth] [--tls]   install (first time) and start; prints `export VAR=...`
#   e2e/cassandra/cassandra.sh up --pair             a two-node cluster instead (see `pair` below)
#   e2e/cassandra/cassandra.sh down [VARIANT...]     stop what `up` started (every variant without one)
#   e2e/cassandra/cassandra.sh status                what is running
#
# Use it as:   eval "$(e2e/cassandra/cassandra.sh up --auth)"
#
# Variants, each its own JVM, data and ports, so they can run side by side (measured: about 1.5 GB RSS
# each with the default 1 GiB heap, about 1 GB with CASSANDRA_HEAP=512m; ~2% of a core each when idle):
#   plain     CQL on 127.0.0.1:$CASSANDRA_PORT      (default 19042)
#   auth      CQL on 127.0.0.1:$CASSANDRA_PORT+1    PasswordAuthenticator + CassandraAuthorizer,
#             superuser cassandra/cassandra
#   tls       CQL on 127.0.0.1:$CASSANDRA_PORT+2    client_encryption_options enabled (TLS only, no
#             client certificates), server certificate for 127.0.0.1/localhost signed by a CA made here
#   auth-tls  CQL on 127.0.0.1:$CASSANDRA_PORT+3    both
#   pair      a two-node cluster: pair-1 on 127.0.0.1:$CASSANDRA_PORT+4 and pair-2 on +5 (both seeds, one
#             token each), for what needs a real peer in system.peers_v2; started with a 512 MiB heap
#             each unless CASSANDRA_HEAP is set
# The internode (storage) port of each is its CQL port minus 2000; nothing else listens (no JMX).
#
# Exports: CASSANDRA_ADDR (host:port of the variant just started) and the same under a per-variant name
# (CASSANDRA_PLAIN_ADDR, CASSANDRA_AUTH_ADDR, CASSANDRA_TLS_ADDR, CASSANDRA_AUTH_TLS_ADDR, and with --pair
# CASSANDRA_PAIR_1_ADDR and CASSANDRA_PAIR_2_ADDR);
# CASSANDRA_USER/CASSANDRA_PASSWORD with --auth; CASSANDRA_TLS_CA (PEM CA certificate) and
# CASSANDRA_TLS_DIR with --tls; CASSANDRA_VERSION always.
#
# Environment knobs: CASSANDRA_PORT (base CQL port, 19042), CASSANDRA_HEAP (1g), CASSANDRA_START_TIMEOUT
# (240 s), CASSANDRA_STOP_TIMEOUT (60 s), CASSANDRA_KEEP_DATA=1 (keep the data of the last run instead of
# starting from an empty node), CASSANDRA_EXTRA_YAML (a file whose lines are appended to cassandra.yaml;
# do not repeat a key this script writes).
#
# Smoke test with the DataStax Python driver:  eval "$(e2e/cassandra/cassandra.sh up)"; python3 e2e/cassandra/smoke.py
#
# Install: the jars of org.apache.cassandra:cassandra-all (version pinned in pom.xml beside this script)
# and its runtime dependencies, copied by Maven into $STATE/cassandra/dist/lib; redone only when pom.xml
# changes. We write cassandra.yaml and logback.xml ourselves and start
# org.apache.cassandra.service.CassandraDaemon directly with the flags of Cassandra's jvm17-server.options.
#
# State lives under $SHOTOVER_E2E_DIR (default ~/.cache/shotover-e2e)/cassandra/{dist,VARIANT}. Starting
# is idempotent: a variant that already answers CQL is left alone. Progress goes to stderr, the export
# lines to stdout. Needs java 11 or 17, mvn and python3 (the CQL probe, cqlcheck.py, uses only its
# standard library); java and mvn are installed from Debian if missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SHOTOVER_E2E_DIR:-$HOME/.cache/shotover-e2e}"
ROOT="$STATE/cassandra"
DIST="$ROOT/dist"
BASE_PORT="${CASSANDRA_PORT:-19042}"
HEAP="${CASSANDRA_HEAP:-1g}"
START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-240}"
STOP_TIMEOUT="${CASSANDRA_STOP_TIMEOUT:-60}"
VARIANTS=(plain auth tls auth-tls pair-1 pair-2)

log() { echo "e2e/cassandra: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root to run: $*"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} from Debian"
  as_root apt-get update -qq >&2 || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------- install

ensure_tools() {
  command -v python3 >/dev/null || die "python3 is needed (for the CQL readiness probe)"
  command -v java >/dev/null && command -v keytool >/dev/null || apt_install openjdk-17-jdk-headless
  command -v mvn >/dev/null || apt_install maven
  command -v openssl >/dev/null || apt_install openssl
  local v
  v=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  case "$v" in
    11|17) ;;
    *) log "WARNING: java $v found; Cassandra 5.0 supports only Java 11 and 17" ;;
  esac
}

pom_version() { grep -A1 '<artifactId>cassandra-all</artifactId>' "$HERE/pom.xml" | sed -n 's:.*<version>\(.*\)</version>.*:\1:p'; }

install_dist() {
  local stamp
  stamp=$(sha256sum "$HERE/pom.xml" | cut -d' ' -f1)
  if [ -f "$DIST/stamp" ] && [ "$(cat "$DIST/stamp")" = "$stamp" ] && [ -d "$DIST/lib" ]; then
    return 0
  fi
  log "resolving cassandra-all $(pom_version) and its runtime dependencies from Maven Central (first time only)"
  mkdir -p "$DIST"
  rm -rf "$DIST/lib.new" "$DIST/lib" "$DIST/stamp"
  if ! mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$DIST/lib.new" >"$DIST/mvn.log" 2>&1; then
    tail -n 30 "$DIST/mvn.log" >&2
    die "mvn dependency:copy-dependencies failed (is Maven Central reachable?), full output in $DIST/mvn.log"
  fi
  ls "$DIST/lib.new"/cassandra-all-*.jar >/dev/null 2>&1 || die "no cassandra-all jar after mvn"
  mv "$DIST/lib.new" "$DIST/lib"
  echo "$stamp" > "$DIST/stamp"
  log "installed $(ls "$DIST/lib" | wc -l) jars ($(du -sh "$DIST/lib" | cut -f1)) in $DIST/lib"
}

# ---------------------------------------------------------------- per-variant setup

variant_index() {
  local i
  for i in "${!VARIANTS[@]}"; do [ "${VARIANTS[$i]}" = "$1" ] && { echo "$i"; return 0; }; done
  die "unknown variant '$1' (known: ${VARIANTS[*]})"
}
native_port() { echo $(( BASE_PORT + $(variant_index "$1") )); }
storage_port() { echo $(( $(native_port "$1") - 2000 )); }
has_auth() { [[ $1 == auth* ]]; }
is_pair() { [[ $1 == pair-* ]]; }
has_tls() { [[ $1 == *tls ]]; }

make_tls() {
  local dir=$1
  [ -f "$dir/keystore.jks" ] && [ -f "$dir/truststore.jks" ] && return 0
  log "making a CA, a server certificate for 127.0.0.1/localhost and Java keystores in $dir"
  rm -rf "$dir"; mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=shotover-e2e-cassandra-ca" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1 || die "openssl: CA failed"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1 || die "openssl: CSR failed"
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$dir/ext.cnf"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -extfile "$dir/ext.cnf" -out "$dir/server.crt" >/dev/null 2>&1 || die "openssl: signing failed"
  openssl pkcs12 -export -name cassandra -in "$dir/server.crt" -inkey "$dir/server.key" \
    -certfile "$dir/ca.crt" -passout pass:cassandra -out "$dir/server.p12" >/dev/null 2>&1 \
    || die "openssl: pkcs12 export failed"
  keytool -importkeystore -noprompt -srckeystore "$dir/server.p12" -srcstoretype PKCS12 \
    -srcstorepass cassandra -destkeystore "$dir/keystore.jks" -deststoretype JKS \
    -deststorepass cassandra -destkeypass cassandra >/dev/null 2>&1 || die "keytool: keystore failed"
  keytool -importcert -noprompt -alias ca -file "$dir/ca.crt" -keystore "$dir/truststore.jks" \
    -storetype JKS -storepass cassandra >/dev/null 2>&1 || die "keytool: truststore failed"
}

write_config() {
  local variant=$1 inst=$2 port storage cluster=$1 token=0 seeds
  port=$(native_port "$variant"); storage=$(storage_port "$variant")
  seeds="127.0.0.1:$storage"
  if is_pair "$variant"; then
    # Two nodes on one address with their own ports (Cassandra 4.0+), both seeds, so neither
    # bootstraps; each owns half of the ring.
    cluster=pair
    seeds="127.0.0.1:$(storage_port pair-1),127.0.0.1:$(storage_port pair-2)"
    [ "$variant" = pair-2 ] && token=4611686018427387904
  fi
  mkdir -p "$inst/conf"
  cat > "$inst/conf/cassandra.yaml" <<EOF
# Written by e2e/cassandra/cassandra.sh (variant $variant); overwritten at every start.
cluster_name: shotover-e2e-$cluster
num_tokens: 1
initial_token: $token
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$seeds"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $storage
native_transport_port: $port
start_native_transport: true
data_file_directories:
  - $inst/data/data
commitlog_directory: $inst/data/commitlog
saved_caches_directory: $inst/data/saved_caches
hints_directory: $inst/data/hints
cdc_raw_directory: $inst/data/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
# small machine, tests only
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 2
concurrent_compactors: 1
memtable_flush_writers: 1
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
key_cache_size: 8MiB
row_cache_size: 0MiB
counter_cache_size: 4MiB
prepared_statements_cache_size: 16MiB
hinted_handoff_enabled: false
auto_snapshot: false
EOF
  if has_auth "$variant"; then
    cat >> "$inst/conf/cassandra.yaml" <<EOF
authenticator: PasswordAuthenticator
authorizer: CassandraAuthorizer
role_manager: CassandraRoleManager
EOF
  fi
  if has_tls "$variant"; then
    make_tls "$inst/tls"
    cat >> "$inst/conf/cassandra.yaml" <<EOF
client_encryption_options:
  enabled: true
  optional: false
  keystore: $inst/tls/keystore.jks
  keystore_password: cassandra
  truststore: $inst/tls/truststore.jks
  truststore_password: cassandra
  require_client_auth: false
EOF
  fi
  if [ -n "${CASSANDRA_EXTRA_YAML:-}" ]; then
    { echo "# from \$CASSANDRA_EXTRA_YAML=$CASSANDRA_EXTRA_YAML"; cat "$CASSANDRA_EXTRA_YAML"; } >> "$inst/conf/cassandra.yaml"
  fi
  cat > "$inst/conf/logback.xml" <<EOF
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$inst/logs/system.log</file>
    <append>false</append>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
}

# ---------------------------------------------------------------- process handling

# our_pid INST: the pid of this instance's JVM if it is alive (guards against a recycled pid)
our_pid() {
  local inst=$1 pid
  [ -f "$inst/pid" ] || return 1
  pid=$(cat "$inst/pid")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-Dshotover.e2e.instance=$inst " || return 1
  echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

probe() {  # probe VARIANT: a real CQL handshake (and login); prints the release version
  local variant=$1 inst="$ROOT/$1" args=()
  has_auth "$variant" && args+=(--user cassandra --password cassandra)
  has_tls "$variant" && args+=(--ca "$inst/tls/ca.crt")
  python3 "$HERE/cqlcheck.py" 127.0.0.1 "$(native_port "$variant")" --timeout 5 "${args[@]}"
}

show_logs() {
  local inst=$1
  if [ -s "$inst/logs/system.log" ]; then
    log "last lines of $inst/logs/system.log:"
    tail -n 40 "$inst/logs/system.log" >&2
  fi
  if [ -s "$inst/logs/console.log" ]; then
    log "last lines of $inst/logs/console.log (JVM stdout/stderr):"
    tail -n 20 "$inst/logs/console.log" >&2
  fi
}

start_jvm() {
  local variant=$1 inst=$2 jamm
  jamm=$(ls "$DIST"/lib/jamm-*.jar 2>/dev/null | head -1)
  [ -n "$jamm" ] || die "no jamm jar in $DIST/lib"
  local opts=(
    -Xms"$HEAP" -Xmx"$HEAP" -Xss256k
    # conf/jvm-server.options (common part; no AlwaysPreTouch, no heap dumps)
    -ea -da:net.openhft... -XX:+UseThreadPriorities -XX:+UseTLAB -XX:+ResizeTLAB
    -XX:+PerfDisableSharedMem -XX:StringTableSize=1000003 -Djava.net.preferIPv4Stack=true
    -XX:+ExitOnOutOfMemoryError
    # conf/jvm17-server.options
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    # bin/cassandra
    -javaagent:"$jamm"
    -Dcassandra.config="file://$inst/conf/cassandra.yaml"
    -Dcassandra-foreground=yes
    -Dcassandra.storagedir="$inst/data"
    -Dcassandra.logdir="$inst/logs"
    -Dcassandra.triggers_dir="$inst/triggers"
    -Dlogback.configurationFile="$inst/conf/logback.xml"
    # fast single-node test start
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.load_ring_state=false
    -Dcassandra.superuser_setup_delay_ms=0
    -Dcassandra.unsafesystem=true
    -Dcassandra.shutdown_announce_in_ms=0
    # marks the process as ours (see our_pid)
    -Dshotover.e2e.instance="$inst"
    -cp "$inst/conf:$DIST/lib/*"
    org.apache.cassandra.service.CassandraDaemon
  )
  # A new session, so the JVM outlives the caller and a Ctrl-C/job kill of the caller does not reach it;
  # stdout/stderr go to a file, so `$(cassandra.sh up)` does not wait for the JVM.
  ( cd "$inst" && exec setsid java "${opts[@]}" </dev/null >"$inst/logs/console.log" 2>&1 9>&- ) &
  local pid=$!
  echo "$pid" > "$inst/pid"
  # setsid forks when it is a process-group leader (caller with job control): then find the JVM itself.
  sleep 0.2
  if ! our_pid "$inst" >/dev/null; then
    local real
    real=$(pgrep -f -- "-Dshotover.e2e.instance=$inst " | head -1 || true)
    [ -n "$real" ] && echo "$real" > "$inst/pid"
  fi
}

# ---------------------------------------------------------------- commands

up() {
  local auth=0 tls=0 pair=0 variant
  for arg in "$@"; do
    case "$arg" in
      --auth) auth=1 ;;
      --tls) tls=1 ;;
      --pair) pair=1 ;;
      *) die "usage: cassandra.sh up [--auth] [--tls] | up --pair" ;;
    esac
  done
  if [ "$pair" = 1 ]; then
    [ "$auth$tls" = 00 ] || die "--pair takes neither --auth nor --tls"
    HEAP="${CASSANDRA_HEAP:-512m}"
    # Start pair-1 without waiting: a seed waits for its fellow seed before it serves.
    up_variant pair-1 start-only
    up_variant pair-2
    up_variant pair-1
    return
  fi
  case "$auth$tls" in 00) variant=plain ;; 10) variant=auth ;; 01) variant=tls ;; 11) variant=auth-tls ;; esac
  up_variant "$variant"
}

up_variant() {  # VARIANT [start-only]
  local variant=$1 start_only=${2:-}
  local inst="$ROOT/$variant" port storage version pid
  port=$(native_port "$variant"); storage=$(storage_port "$variant")
  # one `up` per variant at a time (e.g. test binaries started in parallel); the JVM does not inherit fd 9
  mkdir -p "$inst"
  exec 9>"$inst/lock"
  flock -w "$START_TIMEOUT" 9 || die "another cassandra.sh up ($variant) held $inst/lock for $START_TIMEOUT s"

  if pid=$(our_pid "$inst"); then
    if version=$(probe "$variant" 2>/dev/null); then
      log "cassandra ($variant) already running on 127.0.0.1:$port (pid $pid)"
    else
      log "cassandra ($variant) is starting (pid $pid), waiting for it"
    fi
  else
    ensure_tools
    install_dist
    for p in "$port" "$storage"; do
      port_busy "$p" && die "127.0.0.1:$p is already in use by something else (see CASSANDRA_PORT)"
    done
    mkdir -p "$inst/logs"
    if [ "${CASSANDRA_KEEP_DATA:-0}" != 1 ]; then rm -rf "$inst/data"; fi
    mkdir -p "$inst/data" "$inst/triggers"
    write_config "$variant" "$inst"
    log "starting cassandra ($variant) on 127.0.0.1:$port, log in $inst/logs/system.log"
    start_jvm "$variant" "$inst"
    version=""
  fi
  [ "$start_only" = start-only ] && return 0

  if [ -z "${version:-}" ]; then
    local start deadline
    start=$(date +%s); deadline=$(( start + START_TIMEOUT ))
    until version=$(probe "$variant" 2>/dev/null); do
      if ! pid=$(our_pid "$inst"); then
        show_logs "$inst"
        die "cassandra ($variant) exited during startup (logs above, all in $inst/logs)"
      fi
      if [ "$(date +%s)" -ge "$deadline" ]; then
        show_logs "$inst"
        log "last probe error: $(probe "$variant" 2>&1 >/dev/null || true)"
        stop_instances "$variant"
        die "cassandra ($variant) did not answer CQL within $START_TIMEOUT s; stopped it (logs above)"
      fi
      sleep 0.5
    done
    log "cassandra $version ($variant) answers CQL on 127.0.0.1:$port after $(( $(date +%s) - start )) s"
  fi

  local upper=${variant^^}; upper=${upper//-/_}
  echo "export CASSANDRA_ADDR=127.0.0.1:$port"
  echo "export CASSANDRA_${upper}_ADDR=127.0.0.1:$port"
  echo "export CASSANDRA_VERSION=$version"
  if has_auth "$variant"; then
    echo "export CASSANDRA_USER=cassandra"
    echo "export CASSANDRA_PASSWORD=cassandra"
  fi
  if has_tls "$variant"; then
    echo "export CASSANDRA_TLS_CA=$inst/tls/ca.crt"
    echo "export CASSANDRA_TLS_DIR=$inst/tls"
  fi
}

# stop_instances VARIANT...: SIGTERM to all of them first (Cassandra drains and flushes on SIGTERM,
# a few seconds each), then wait for each, bounded by $CASSANDRA_STOP_TIMEOUT; SIGKILL after that.
stop_instances() {
  local v pid pids=() names=()
  for v in "$@"; do
    if pid=$(our_pid "$ROOT/$v"); then
      log "stopping cassandra ($v, pid $pid)"
      kill "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$v")
    else
      rm -f "$ROOT/$v/pid"
    fi
  done
  local deadline=$(( $(date +%s) + STOP_TIMEOUT )) i
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}; v=${names[$i]}
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "cassandra ($v) still running after $STOP_TIMEOUT s, killing it"
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && die "could not stop cassandra ($v, pid $pid)"
    fi
    rm -f "$ROOT/$v/pid"
    log "stopped cassandra ($v)"
  done
}

down() {
  local names=() arg auth=0 tls=0
  for arg in "$@"; do
    case "$arg" in
      --auth) auth=1 ;;
      --tls) tls=1 ;;
      *) variant_index "$arg" >/dev/null; names+=("$arg") ;;
    esac
  done
  case "$auth$tls" in 10) names+=(auth) ;; 01) names+=(tls) ;; 11) names+=(auth-tls) ;; esac
  [ ${#names[@]} -eq 0 ] && names=("${VARIANTS[@]}")
  stop_instances "${names[@]}"
}

status() {
  local v pid
  for v in "${VARIANTS[@]}"; do
    if pid=$(our_pid "$ROOT/$v"); then
      echo "cassandra-$v: running (pid $pid, 127.0.0.1:$(native_port "$v"))"
    else
      echo "cassandra-$v: stopped"
    fi
  done
}

cmd=${1:-}; shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down "$@" ;;
  status) status ;;
  *) die "usage: cassandra.sh up [--auth] [--tls] | up --pair | down [plain|auth|tls|auth-tls|pair-1|pair-2...] | status" ;;
esac
