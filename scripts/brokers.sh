#!/usr/bin/env bash
# Test brokers for the conformance suite and the broker tests, on 127.0.0.1 only.
#
#   scripts/brokers.sh start  nats   # use what answers on 127.0.0.1:4222 with JetStream, else start one
#   scripts/brokers.sh status nats   # exit 0 when a JetStream server answers on the port
#   scripts/brokers.sh stop   nats   # stop only a server this script started
#   scripts/brokers.sh start  redis  # use what answers PING on 127.0.0.1:6379, else start one
#   scripts/brokers.sh start  nats redis
#   scripts/brokers.sh start  kafka  # use a Kafka-API broker on 127.0.0.1:9092, else start tansu
#   scripts/brokers.sh build  kafka  # only build (and cache) the tansu binary
#   scripts/brokers.sh start  postgres  # use postgres@127.0.0.1:5432 (trust), else initdb + pg_ctl one
#   scripts/brokers.sh start  s3     # use an S3 server on 127.0.0.1:9000, else start moto's
#
# Idempotent. `start` uses a nats-server already listening on 127.0.0.1:${NATS_PORT:-4222} when
# it has JetStream enabled (checked with a JetStream account-info request); a server there without
# JetStream is an error (this script does not kill what it did not start). Otherwise it installs
# Debian's nats-server when missing (as root) and starts
#   nats-server -js -a 127.0.0.1 -p 4222 -sd <repo>/.brokers/nats
# in the background with a pid file, and waits until JetStream answers.
#
# Redis: `start redis` uses a server already answering PING (+PONG) on 127.0.0.1:${REDIS_PORT:-6379}
# (one that wants AUTH is an error: the tests use the default user without a password);
# otherwise it installs Debian's redis-server when missing (as root) and starts
#   redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --dir <repo>/.brokers/redis
# in the background with a pid file, and waits for PONG. `stop redis` stops only that one.
#
# Kafka: `start kafka` uses a broker already answering a Kafka ApiVersions request on
# 127.0.0.1:${KAFKA_PORT:-9092}; otherwise it starts the Kafka-API broker tansu 0.6.0 with its
# in-memory storage engine (nothing kept across restarts). tansu is built once per machine with
#   cargo install tansu --version 0.6.0 --locked --features dynostore --root ~/.cache/ampybus/tansu-0.6.0
# (--locked: newer dependencies want a newer rustc; dynostore gives the memory:// engine).
#
# PostgreSQL (the archive's tests): `start postgres` uses a server already accepting
# `postgres@127.0.0.1:${PG_PORT:-5432}` without a password (checked with `psql -c 'select 1'`);
# otherwise it installs Debian's postgresql when missing (as root) and starts one with
#   initdb -U postgres --auth=trust -D <repo>/.brokers/postgres/data
#   pg_ctl -D … -o '-c listen_addresses=127.0.0.1 -p 5432 -c unix_socket_directories=…' start
# (as the `postgres` system user when run as root: initdb refuses root). `stop postgres` stops
# only that one.
#
# S3 (the blob store's tests): `start s3` uses an S3-compatible server already answering an
# anonymous ListBuckets on 127.0.0.1:${S3_PORT:-9000}; otherwise it starts moto's S3 server
# (in memory, nothing kept across restarts), installed once per machine with
#   python3 -m venv ~/.cache/ampybus/moto-5.2.1 && pip install 'moto[server]==5.2.1'
# and started as `moto_server -H 127.0.0.1 -p 9000`. It accepts any credentials; the tests
# create their own buckets. `stop s3` stops only that one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
state="$root/.brokers"
port="${NATS_PORT:-4222}"

# Stops the server this script started for `$1` (pid in $state/$1.pid) when its command line
# still matches `$2`; anything else is left alone.
stop_started() {
    local name=$1 match=$2 pid
    if [ -f "$state/$name.pid" ]; then
        pid=$(cat "$state/$name.pid")
        if kill -0 "$pid" 2>/dev/null && grep -q "$match" "/proc/$pid/cmdline" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "$name: stopped pid $pid"
        else
            echo "$name: pid $pid is not running"
        fi
        rm -f "$state/$name.pid"
    else
        echo "$name: nothing started by this script"
    fi
}

# Waits up to 20 s for the server just started for `$1` (pid in $state/$1.pid, log in
# $state/$1.log) on port `$4` until the probe `$2` passes; says which program (`$3`) failed
# otherwise.
wait_started() {
    local name=$1 probe=$2 program=$3 port=$4
    for _ in $(seq 1 200); do
        if "$probe"; then
            echo "$name: ready on 127.0.0.1:$port (pid $(cat "$state/$name.pid"))"
            return 0
        fi
        if ! kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "error: $program did not become ready; log: $state/$name.log" >&2
    tail -20 "$state/$name.log" >&2 || true
    return 1
}

# A JetStream account-info request over the plain NATS protocol (no client needed):
# CONNECT with headers, SUB to an inbox, PUB $JS.API.INFO, read the answer.
nats_js_ok() {
    command -v python3 >/dev/null 2>&1 || { echo "python3 is needed to probe NATS" >&2; return 2; }
    python3 - "$port" <<'PY'
import socket, sys
port = int(sys.argv[1])
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
except OSError:
    sys.exit(3)  # nothing listening
s.settimeout(3)
buf = b""
try:
    while b"\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(4)
        buf += chunk
    if not buf.startswith(b"INFO"):
        sys.exit(4)  # not NATS
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1}\r\n'
              b"SUB _INBOX.brokerprobe 1\r\nPUB $JS.API.INFO _INBOX.brokerprobe 0\r\n\r\nPING\r\n")
    data = b""
    while b"MSG _INBOX.brokerprobe" not in data and b"HMSG _INBOX.brokerprobe" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    # Read the whole message: `MSG <subject> <sid> <len>` or
    # `HMSG <subject> <sid> <header len> <total len>`, then <total len> bytes and CRLF.
    at = data.find(b"MSG _INBOX.brokerprobe")
    while b"\r\n" not in data[at:]:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    line_end = data.find(b"\r\n", at)
    total = int(data[at:line_end].split()[-1]) if line_end > 0 else 0
    while len(data) < line_end + 2 + total:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    data = data[line_end + 2:line_end + 2 + total] if line_end > 0 else data
except (OSError, ValueError):
    sys.exit(5)
# A "no responders" status (an HMSG whose header block is NATS/1.0 503) means no JetStream. Otherwise the answer is
# a JSON account-info document; only its own fields decide (its numbers may contain "503").
if data.startswith(b"NATS/1.0 503"):
    sys.exit(6)  # NATS without JetStream
import json
start = data.find(b"{")
if start < 0:
    sys.exit(6)
try:
    doc, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "replace"))
except ValueError:
    sys.exit(6)
if doc.get("type") == "io.nats.jetstream.api.v1.account_info_response" and "error" not in doc:
    sys.exit(0)
sys.exit(6)
PY
}

wait_ready() {
    for _ in $(seq 1 100); do
        if nats_js_ok; then return 0; fi
        sleep 0.1
    done
    return 1
}

start_nats() {
    local rc=0
    nats_js_ok || rc=$?
    case $rc in
        0) echo "nats: JetStream server already answering on 127.0.0.1:$port"; return 0 ;;
        3) ;; # nothing listening: start one
        6) echo "error: a NATS server on 127.0.0.1:$port has no JetStream (start it with -js); not touching it" >&2; return 1 ;;
        *) echo "error: something on 127.0.0.1:$port is not a usable NATS server (probe exit $rc)" >&2; return 1 ;;
    esac
    if ! command -v nats-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "nats: installing Debian's nats-server"
            apt-get install -y nats-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nats-server >/dev/null; }
        else
            echo "error: nats-server is not installed (apt-get install nats-server)" >&2
            return 1
        fi
    fi
    local bin
    bin=$(command -v nats-server)
    mkdir -p "$state/nats"
    echo "nats: starting $bin -js -a 127.0.0.1 -p $port -sd $state/nats"
    nohup "$bin" -js -a 127.0.0.1 -p "$port" -sd "$state/nats" >"$state/nats.log" 2>&1 &
    echo $! >"$state/nats.pid"
    if ! wait_ready; then
        echo "error: nats-server did not become ready; log: $state/nats.log" >&2
        tail -20 "$state/nats.log" >&2 || true
        return 1
    fi
    echo "nats: ready on 127.0.0.1:$port (pid $(cat "$state/nats.pid"))"
}

stop_nats() { stop_started nats nats-server; }

status_nats() {
    if nats_js_ok; then
        echo "nats: JetStream answering on 127.0.0.1:$port$( [ -f "$state/nats.pid" ] && echo " (started by this script, pid $(cat "$state/nats.pid"))")"
    else
        echo "nats: no JetStream server on 127.0.0.1:$port"
        return 1
    fi
}

redis_port="${REDIS_PORT:-6379}"

# PING over a plain TCP connection (bash's /dev/tcp; no redis-cli needed). Exit codes: 0 PONG,
# 3 nothing listening, 6 the server wants AUTH, 4 something else.
redis_ping() {
    local line=""
    if ! { exec 3<>"/dev/tcp/127.0.0.1/$redis_port"; } 2>/dev/null; then
        return 3
    fi
    printf 'PING\r\n' >&3
    IFS= read -r -t 3 line <&3 || true
    exec 3<&- 3>&- || true
    line="${line%$'\r'}"
    case "$line" in
        "+PONG") return 0 ;;
        -NOAUTH*|-WRONGPASS*) return 6 ;;
        *) return 4 ;;
    esac
}

redis_wait_ready() {
    for _ in $(seq 1 100); do
        if redis_ping; then return 0; fi
        sleep 0.1
    done
    return 1
}

start_redis() {
    local rc=0
    redis_ping || rc=$?
    case $rc in
        0) echo "redis: server already answering PING on 127.0.0.1:$redis_port"; return 0 ;;
        3) ;; # nothing listening: start one
        6) echo "error: the Redis server on 127.0.0.1:$redis_port requires AUTH; the tests need one without (not touching it)" >&2; return 1 ;;
        *) echo "error: something on 127.0.0.1:$redis_port is not a usable Redis server (probe exit $rc)" >&2; return 1 ;;
    esac
    if ! command -v redis-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "redis: installing Debian's redis-server"
            DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >/dev/null 2>&1 || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >/dev/null; }
        else
            echo "error: redis-server is not installed (apt-get install redis-server)" >&2
            return 1
        fi
    fi
    local bin
    bin=$(command -v redis-server)
    mkdir -p "$state/redis"
    echo "redis: starting $bin --bind 127.0.0.1 --port $redis_port (no persistence) in $state/redis"
    nohup "$bin" --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
        --dir "$state/redis" --daemonize no >"$state/redis.log" 2>&1 &
    echo $! >"$state/redis.pid"
    if ! redis_wait_ready; then
        echo "error: redis-server did not become ready; log: $state/redis.log" >&2
        tail -20 "$state/redis.log" >&2 || true
        return 1
    fi
    echo "redis: ready on 127.0.0.1:$redis_port (pid $(cat "$state/redis.pid"))"
}

stop_redis() { stop_started redis redis-server; }

status_redis() {
    if redis_ping; then
        echo "redis: answering PING on 127.0.0.1:$redis_port$( [ -f "$state/redis.pid" ] && echo " (started by this script, pid $(cat "$state/redis.pid"))")"
    else
        echo "redis: no usable server on 127.0.0.1:$redis_port"
        return 1
    fi
}

kafka_port="${KAFKA_PORT:-9092}"
tansu_version="0.6.0"
# Where the tansu binary is built once per machine (cargo install --root); override with
# AMPYBUS_TOOLS_DIR. CI on the same machine reuses it.
tools_dir="${AMPYBUS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ampybus}"
tansu_root="$tools_dir/tansu-$tansu_version"
tansu_bin="$tansu_root/bin/tansu"

# A Kafka ApiVersions (v0) request over TCP. Exit codes: 0 a Kafka-API broker answered,
# 3 nothing listening, 4 something else.
kafka_ok() {
    python3 - "$kafka_port" <<'PY'
import socket, struct, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
except OSError:
    sys.exit(3)
s.settimeout(3)
client = b"ampybus-probe"
body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
try:
    s.sendall(struct.pack(">i", len(body)) + body)
    data = b""
    while len(data) < 10:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(4)
        data += chunk
except OSError:
    sys.exit(4)
size, corr, err = struct.unpack(">iih", data[:10])
sys.exit(0 if corr == 7 and err == 0 else 4)
PY
}

# Builds tansu once (about 12 minutes on 2 cores) under a lock, so parallel callers wait
# for one build.
ensure_tansu() {
    if [ -x "$tansu_bin" ]; then return 0; fi
    mkdir -p "$tools_dir"
    exec 8>"$tools_dir/tansu.lock"
    if command -v flock >/dev/null 2>&1; then flock 8; fi
    if [ ! -x "$tansu_bin" ]; then
        echo "kafka: building tansu $tansu_version into $tansu_root (once per machine; about 12 minutes on 2 cores)"
        cargo install tansu --version "$tansu_version" --locked --features dynostore \
            --root "$tansu_root" >"$tools_dir/tansu-build.log" 2>&1 || {
            echo "error: building tansu failed; log: $tools_dir/tansu-build.log" >&2
            tail -30 "$tools_dir/tansu-build.log" >&2
            return 1
        }
    fi
    exec 8>&-
}

start_kafka() {
    local rc=0
    kafka_ok || rc=$?
    case $rc in
        0) echo "kafka: a Kafka-API broker is already answering on 127.0.0.1:$kafka_port"; return 0 ;;
        3) ;;
        *) echo "error: something on 127.0.0.1:$kafka_port is not a Kafka-API broker (probe exit $rc)" >&2; return 1 ;;
    esac
    ensure_tansu
    mkdir -p "$state"
    echo "kafka: starting $tansu_bin broker (memory storage) on 127.0.0.1:$kafka_port"
    nohup "$tansu_bin" broker \
        --storage-engine "memory://tansu/" \
        --listener-url "tcp://127.0.0.1:$kafka_port" \
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
        >"$state/kafka.log" 2>&1 &
    echo $! >"$state/kafka.pid"
    wait_started kafka kafka_ok tansu "$kafka_port"
}

stop_kafka() { stop_started kafka tansu; }

status_kafka() {
    if kafka_ok; then
        echo "kafka: a Kafka-API broker answers on 127.0.0.1:$kafka_port$( [ -f "$state/kafka.pid" ] && echo " (started by this script, pid $(cat "$state/kafka.pid"))")"
    else
        echo "kafka: no Kafka-API broker on 127.0.0.1:$kafka_port"
        return 1
    fi
}

pg_port="${PG_PORT:-5432}"
pg_state="$state/postgres"
pg_bin_dir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    return 1
}

# 0: postgres@127.0.0.1 answers without a password; 3: nothing listening; 4: something else.
pg_ok() {
    command -v psql >/dev/null 2>&1 || { [ -x "$(pg_bin_dir 2>/dev/null)/psql" ] || return 3; }
    local psql_bin
    psql_bin=$(command -v psql || echo "$(pg_bin_dir)/psql")
    local out
    if out=$(PGCONNECT_TIMEOUT=3 "$psql_bin" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -w -tAc 'select 1' 2>&1); then
        [ "$out" = 1 ] && return 0
        return 4
    fi
    case "$out" in
        *"Connection refused"*|*"could not connect"*) return 3 ;;
        *) return 4 ;;
    esac
}

start_postgres() {
    local rc=0
    pg_ok || rc=$?
    case $rc in
        0) echo "postgres: server already accepting postgres@127.0.0.1:$pg_port"; return 0 ;;
        3) ;;
        *) echo "error: something on 127.0.0.1:$pg_port does not accept postgres without a password (probe exit $rc); not touching it" >&2; return 1 ;;
    esac
    if ! pg_bin_dir >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "postgres: installing Debian's postgresql"
            DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >/dev/null 2>&1 || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >/dev/null; }
        else
            echo "error: PostgreSQL is not installed (apt-get install postgresql)" >&2
            return 1
        fi
    fi
    local bin as=()
    bin=$(pg_bin_dir)
    mkdir -p "$state/postgres"
    if [ "$(id -u)" = 0 ]; then
        as=(runuser -u postgres --)
        chown -R postgres "$state/postgres"
        if ! runuser -u postgres -- test -w "$state/postgres"; then
            # The checkout is not reachable by the postgres user (e.g. under /root): keep the
            # data directory where it is, and say so.
            pg_state="/var/tmp/ampybus-postgres-$pg_port"
            mkdir -p "$pg_state" && chown postgres "$pg_state"
            echo "postgres: $state/postgres is not reachable by the postgres user; data in $pg_state"
            ln -sfn "$pg_state" "$state/postgres/external"
        fi
    fi
    if [ ! -f "$pg_state/data/PG_VERSION" ]; then
        "${as[@]}" "$bin/initdb" -U postgres --auth=trust -E UTF8 -D "$pg_state/data" >"$state/postgres.log" 2>&1 || {
            echo "error: initdb failed; log: $state/postgres.log" >&2; tail -20 "$state/postgres.log" >&2; return 1; }
    fi
    echo "postgres: starting $bin/postgres on 127.0.0.1:$pg_port in $pg_state/data"
    "${as[@]}" "$bin/pg_ctl" -D "$pg_state/data" -l "$pg_state/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$pg_state -c fsync=on" start >/dev/null || {
        echo "error: PostgreSQL did not start; log: $pg_state/server.log" >&2
        tail -20 "$pg_state/server.log" >&2 || true
        return 1
    }
    head -1 "$pg_state/data/postmaster.pid" >"$state/postgres.pid"
    pg_ok || { echo "error: PostgreSQL started but does not accept postgres@127.0.0.1:$pg_port" >&2; return 1; }
    echo "postgres: ready on 127.0.0.1:$pg_port (pid $(cat "$state/postgres.pid"))"
}

stop_postgres() {
    if [ -f "$state/postgres.pid" ]; then
        [ -L "$state/postgres/external" ] && pg_state=$(readlink "$state/postgres/external")
        local as=()
        [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
        "${as[@]}" "$(pg_bin_dir)/pg_ctl" -D "$pg_state/data" -m fast -w stop >/dev/null 2>&1 \
            && echo "postgres: stopped pid $(cat "$state/postgres.pid")" \
            || echo "postgres: pid $(cat "$state/postgres.pid") is not running"
        rm -f "$state/postgres.pid"
    else
        echo "postgres: nothing started by this script"
    fi
}

status_postgres() {
    if pg_ok; then
        echo "postgres: accepting postgres@127.0.0.1:$pg_port$( [ -f "$state/postgres.pid" ] && echo " (started by this script, pid $(cat "$state/postgres.pid"))")"
    else
        echo "postgres: no usable server on 127.0.0.1:$pg_port"
        return 1
    fi
}

s3_port="${S3_PORT:-9000}"
moto_version="5.2.1"
moto_root="$tools_dir/moto-$moto_version"

# An anonymous ListBuckets (GET /) over HTTP. Exit codes: 0 an S3 server answered,
# 3 nothing listening, 4 something else.
s3_ok() {
    python3 - "$s3_port" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=3) as r:
        body = r.read()
except urllib.error.URLError as e:
    sys.exit(3 if isinstance(e.reason, ConnectionRefusedError) else 4)
except OSError:
    sys.exit(4)
sys.exit(0 if b"ListAllMyBucketsResult" in body else 4)
PY
}

# Installs moto's server once per machine (a venv under the tools dir, marked complete only
# after pip succeeded) under a lock, so parallel callers wait for one install.
ensure_moto() {
    if [ -f "$moto_root/.installed" ]; then return 0; fi
    mkdir -p "$tools_dir"
    exec 7>"$tools_dir/moto.lock"
    if command -v flock >/dev/null 2>&1; then flock 7; fi
    if [ ! -f "$moto_root/.installed" ]; then
        echo "s3: installing moto[server]==$moto_version into $moto_root (once per machine)"
        rm -rf "$moto_root"
        { python3 -m venv "$moto_root" \
            && "$moto_root/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"; } \
            >"$tools_dir/moto-install.log" 2>&1 || {
            echo "error: installing moto failed; log: $tools_dir/moto-install.log" >&2
            tail -30 "$tools_dir/moto-install.log" >&2
            rm -rf "$moto_root"
            return 1
        }
        touch "$moto_root/.installed"
    fi
    exec 7>&-
}

start_s3() {
    local rc=0
    s3_ok || rc=$?
    case $rc in
        0) echo "s3: an S3-compatible server is already answering on 127.0.0.1:$s3_port"; return 0 ;;
        3) ;;
        *) echo "error: something on 127.0.0.1:$s3_port is not an S3 server (probe exit $rc)" >&2; return 1 ;;
    esac
    ensure_moto
    mkdir -p "$state"
    echo "s3: starting $moto_root/bin/moto_server on 127.0.0.1:$s3_port (in memory)"
    nohup "$moto_root/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$state/s3.log" 2>&1 &
    echo $! >"$state/s3.pid"
    wait_started s3 s3_ok moto_server "$s3_port"
}

stop_s3() { stop_started s3 moto_server; }

status_s3() {
    if s3_ok; then
        echo "s3: answering on 127.0.0.1:$s3_port$( [ -f "$state/s3.pid" ] && echo " (started by this script, pid $(cat "$state/s3.pid"))")"
    else
        echo "s3: no S3-compatible server on 127.0.0.1:$s3_port"
        return 1
    fi
}

cmd="${1:-}"
shift || true
brokers=("$@")
[ ${#brokers[@]} -eq 0 ] && brokers=(nats)
for b in "${brokers[@]}"; do
    case "$cmd:$b" in
        start:nats) start_nats ;;
        stop:nats) stop_nats ;;
        status:nats) status_nats ;;
        start:redis) start_redis ;;
        stop:redis) stop_redis ;;
        status:redis) status_redis ;;
        start:kafka) start_kafka ;;
        stop:kafka) stop_kafka ;;
        status:kafka) status_kafka ;;
        build:kafka) ensure_tansu ;;
        start:postgres) start_postgres ;;
        stop:postgres) stop_postgres ;;
        status:postgres) status_postgres ;;
        start:s3) start_s3 ;;
        stop:s3) stop_s3 ;;
        status:s3) status_s3 ;;
        *:nats|*:redis|*:kafka|*:postgres|*:s3) echo "usage: $0 start|stop|status [nats] [redis] [kafka] [postgres] [s3]  (or: build kafka)" >&2; exit 2 ;;
        *) echo "error: unknown broker \`$b\` (known: nats, redis, kafka, postgres, s3)" >&2; exit 2 ;;
    esac
done
