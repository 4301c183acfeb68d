#!/usr/bin/env bash
# The scale-out path, run for real on one machine (docs/scale_out.md):
#   Postgres (Dagster's run/event/schedule storage, dagster-postgres)
#   Redis (the Celery broker and result backend)
#   2 Celery workers (separate processes; every step of every run executes in one of them)
#   dagster-daemon with the QueuedRunCoordinator and its run limit
#   dagster-webserver (the UI; runs are submitted through its GraphQL, as the UI does)
# It simulates a small demo data set, materializes it across the workers, prints the
# evidence from Postgres and from the UI's GraphQL, then stops everything it started.
#
# Exit codes: 0 ok; 1 the demo failed; 77 services or packages unavailable (the opt-in
# test turns 77 into a skip, printing the reason).
#
# Settings (environment): SCALE_EPOCHS (simulated epochs per run, default 120),
# SCALE_WORKERS (Celery workers, default 2), SCALE_KEEP=1 (keep the temp dir),
# SCALE_SERVICE_USER (non-root user for Postgres/Redis when run as root; default postgres,
# else nobody), SCALE_NO_INSTALL=1 (never apt-get), PYTHON_BIN (default .venv/bin/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(dirname "${PYTHON_BIN:-$REPO/.venv/bin/python}")"
PY="$BIN/python"
export PATH="$BIN:$PATH"   # dagster-celery starts `celery` by name
EPOCHS="${SCALE_EPOCHS:-120}"
N_WORKERS="${SCALE_WORKERS:-2}"
MAX_RUNS="$(sed -n 's/^ *max_concurrent_runs: *\([0-9]*\).*/\1/p' \
  "$REPO/deploy/dagster.scale-out.example.yaml" | head -n1)"
T0="$(date +%s.%N)"
declare -a TIMINGS=()
declare -a GROUPS_STARTED=()   # process-group ids of every service we started (setsid)
PG_CTL=""
PG_DATA=""
WORK=""

say() { printf '[scale-demo %6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*"; }
skip() { echo "SKIP: $*" >&2; exit 77; }
lap() {  # lap NAME START: record the seconds since START
  TIMINGS+=("$(printf '%-34s %6.1f s' "$1" "$(echo "$(date +%s.%N) - $2" | bc)")")
}

as_service() {  # run a command as the non-root service user (or as ourselves if not root)
  if [ "$(id -u)" = 0 ]; then runuser -u "$SERVICE_USER" -- "$@"; else "$@"; fi
}

start_group() {  # start_group NAME LOG CMD...: run CMD in its own session; remember its group
  local name="$1" log="$2"
  shift 2
  setsid "$@" >"$log" 2>&1 &
  LAST_PGID="$!"
  GROUPS_STARTED+=("$LAST_PGID")
  say "started $name (pid/pgid $!, log $log)"
}

stop_group() {  # TERM the whole group, wait, then KILL what is left
  local pgid="$1" i
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for i in $(seq 1 40); do
    pgrep -g "$pgid" >/dev/null 2>&1 || return 0
    sleep 0.5
  done
  echo "group $pgid did not stop after TERM: KILL" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i left=""
  set +e
  trap - EXIT INT TERM
  local t_stop
  t_stop="$(date +%s.%N)"
  for ((i = ${#GROUPS_STARTED[@]} - 1; i >= 0; i--)); do stop_group "${GROUPS_STARTED[$i]}"; done
  if [ -n "$PG_CTL" ] && [ -f "$PG_DATA/postmaster.pid" ]; then
    as_service "$PG_CTL" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
  fi
  for g in "${GROUPS_STARTED[@]}"; do
    pgrep -g "$g" >/dev/null 2>&1 && left="$left $g"
  done
  if [ -n "$PG_DATA" ] && [ -f "$PG_DATA/postmaster.pid" ]; then left="$left postgres"; fi
  if [ -n "$WORK" ] && [ "${SCALE_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
  if [ -n "$left" ]; then
    echo "scale-demo: processes left running: $left" >&2
    rc=1
  else
    say "stopped everything it started (${#GROUPS_STARTED[@]} process groups + postgres)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { "$PY" -c 'import secrets; print(secrets.token_hex(16))'; }

wait_for() {  # wait_for WHAT PGID SECONDS CMD...: retry CMD until it succeeds while PGID lives
  local what="$1" pgid="$2" limit="$3" i
  shift 3
  for i in $(seq 1 "$((limit * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! pgrep -g "$pgid" >/dev/null 2>&1; then
      echo "$what exited before it was ready; its log:" >&2
      tail -n 20 "$WORK/logs/"*"$what"*.log >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
  echo "timed out after ${limit}s waiting for $what" >&2
  return 1
}

apt_install() {  # apt_install PKG...: only as root with apt-get, unless SCALE_NO_INSTALL=1
  if [ "${SCALE_NO_INSTALL:-0}" = 1 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    return 1
  fi
  say "installing Debian packages: $*"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null)
}

find_pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  d="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"
  [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  return 1
}

# --- 0. prerequisites ---------------------------------------------------------------------
t="$(date +%s.%N)"
[ -x "$PY" ] || skip "no project venv at $PY (run make install)"
"$PY" -c 'import dagster_postgres, dagster_celery, redis, psycopg2' 2>/dev/null \
  || skip "the scale extra is not installed: $BIN/pip install -e '$REPO[scale]'"
PG_BIN="$(find_pg_bindir || true)"
if [ -z "$PG_BIN" ]; then
  apt_install postgresql || true
  PG_BIN="$(find_pg_bindir || true)"
fi
[ -n "$PG_BIN" ] || skip "no PostgreSQL server (initdb/pg_ctl); as root: apt-get install postgresql"
if ! command -v redis-server >/dev/null; then apt_install redis-server || true; fi
command -v redis-server >/dev/null || skip "no redis-server; as root: apt-get install redis-server"
command -v bc >/dev/null || skip "no bc (used for timings); apt-get install bc"
if [ "$(id -u)" = 0 ]; then
  # Postgres refuses to run as root: the servers run as an unprivileged system user.
  SERVICE_USER="${SCALE_SERVICE_USER:-$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)}"
else
  SERVICE_USER="$(id -un)"
fi
lap "prerequisites" "$t"
say "postgres: $PG_BIN ($("$PG_BIN/postgres" --version)); $(redis-server --version | cut -d' ' -f1-3)"
say "services run as user '$SERVICE_USER'"

WORK="$(mktemp -d /tmp/rts-scale.XXXXXX)"
chmod 711 "$WORK"
mkdir -p "$WORK/logs" "$WORK/pg" "$WORK/redis" "$WORK/dagster_home"
[ "$(id -u)" = 0 ] && chown "$SERVICE_USER" "$WORK/pg" "$WORK/redis"
chmod 700 "$WORK/pg" "$WORK/redis"

# --- 1. Postgres: initdb into the temp dir, password auth on 127.0.0.1 only -------------
t="$(date +%s.%N)"
PG_PORT="$(free_port)"
PG_PASSWORD="$(secret)"
PG_DATA="$WORK/pg/data"
PG_CTL="$PG_BIN/pg_ctl"
as_service sh -c "umask 077; printf '%s\n' '$PG_PASSWORD' > '$WORK/pg/pwfile'"
as_service "$PG_BIN/initdb" -D "$PG_DATA" -U rts --pwfile="$WORK/pg/pwfile" \
  --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-sync >"$WORK/logs/initdb.log" 2>&1
as_service rm -f "$WORK/pg/pwfile"
as_service "$PG_CTL" -D "$PG_DATA" -l "$WORK/pg/postgres.log" -w -t 60 start \
  -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
  >/dev/null
export DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_PORT="$PG_PORT" DAGSTER_PG_USER=rts
export DAGSTER_PG_PASSWORD="$PG_PASSWORD" DAGSTER_PG_DB=rts_dagster
"$PY" - <<'EOF'
import os, psycopg2
conn = psycopg2.connect(host=os.environ["DAGSTER_PG_HOST"], port=int(os.environ["DAGSTER_PG_PORT"]),
                        user=os.environ["DAGSTER_PG_USER"], password=os.environ["DAGSTER_PG_PASSWORD"],
                        dbname="postgres")
conn.autocommit = True
conn.cursor().execute("CREATE DATABASE rts_dagster")
EOF
lap "postgres initdb + start" "$t"
say "postgres on 127.0.0.1:$PG_PORT (data $PG_DATA), database rts_dagster"

# --- 2. Redis: the broker, password-protected, no persistence -----------------------------
t="$(date +%s.%N)"
REDIS_PORT="$(free_port)"
REDIS_PASSWORD="$(secret)"
as_service sh -c "umask 077; cat > '$WORK/redis/redis.conf'" <<EOF
bind 127.0.0.1
port $REDIS_PORT
requirepass $REDIS_PASSWORD
dir $WORK/redis
save ""
appendonly no
daemonize no
EOF
if [ "$(id -u)" = 0 ]; then
  start_group redis "$WORK/logs/redis.log" runuser -u "$SERVICE_USER" -- redis-server "$WORK/redis/redis.conf"
else
  start_group redis "$WORK/logs/redis.log" redis-server "$WORK/redis/redis.conf"
fi
export CELERY_BROKER_URL="redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0"
export CELERY_RESULT_BACKEND="redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/1"
wait_for "redis" "$LAST_PGID" 30 "$PY" -c "import os, redis; redis.Redis.from_url(os.environ['CELERY_BROKER_URL']).ping()"
lap "redis start" "$t"

# --- 3. the instance and the demo data -----------------------------------------------------
export DAGSTER_HOME="$WORK/dagster_home"
cp "$REPO/deploy/dagster.scale-out.example.yaml" "$DAGSTER_HOME/dagster.yaml"
export RTS_DATA_DIR="$WORK/data"            # on several machines: a shared filesystem
export RTS_OFFLINE_DIR="$RTS_DATA_DIR/wandb"
export WANDB_ERROR_REPORTING=false WANDB_MODE=offline
t="$(date +%s.%N)"
"$BIN/rts" simulate --out "$RTS_OFFLINE_DIR" --epochs "$EPOCHS" | tail -n1
lap "simulate demo runs ($EPOCHS epochs)" "$t"

# Celery worker config: the executor block of the run config, read by `dagster-celery worker`.
( umask 077; cat >"$WORK/celery.yaml" <<EOF
execution:
  config:
    broker: "$CELERY_BROKER_URL"
    backend: "$CELERY_RESULT_BACKEND"
EOF
)

# --- 4. workers, daemon, webserver ---------------------------------------------------------
t="$(date +%s.%N)"
declare -a WORKER_PGIDS=()
for i in $(seq 1 "$N_WORKERS"); do
  # solo pool: each worker executes one step at a time in its own process (the project's
  # steps start spawned subprocesses, which a prefork child may not do).
  start_group "celery worker w$i" "$WORK/logs/worker$i.log" \
    "$BIN/dagster-celery" worker start -A dagster_celery.app -y "$WORK/celery.yaml" -n "w$i" \
    -- --pool solo --concurrency 1
  WORKER_PGIDS+=("$LAST_PGID")
done
start_group "dagster-daemon" "$WORK/logs/daemon.log" \
  "$BIN/dagster-daemon" run -w "$REPO/deploy/workspace.scale-out.yaml"
UI_PORT="$(free_port)"
start_group "dagster-webserver" "$WORK/logs/webserver.log" \
  "$BIN/dagster-webserver" -w "$REPO/deploy/workspace.scale-out.yaml" -h 127.0.0.1 -p "$UI_PORT"
wait_for "webserver" "$LAST_PGID" 180 curl -sf "http://127.0.0.1:$UI_PORT/server_info"
for i in $(seq 1 "$N_WORKERS"); do
  wait_for "worker$i" "${WORKER_PGIDS[$((i - 1))]}" 120 grep -q "ready" "$WORK/logs/worker$i.log"
done
lap "workers + daemon + webserver up" "$t"
say "UI at http://127.0.0.1:$UI_PORT ; $N_WORKERS celery workers ready; run limit $MAX_RUNS"

tools() { "$PY" "$REPO/deploy/scale_demo_tools.py" "$@"; }

# --- 5. materialize: discover, then every partition (queued), then the aggregates ------------
t="$(date +%s.%N)"
ids="$(tools submit --port "$UI_PORT" --job scale_discover)"
tools wait $ids --timeout 300
lap "run scale_discover" "$t"

t="$(date +%s.%N)"
ids="$(tools submit --port "$UI_PORT" --job scale_partition --all-partitions)"
say "queued $(echo $ids | wc -w) scale_partition runs (3 steps each)"
tools wait $ids --timeout 1800
lap "runs scale_partition (all)" "$t"

t="$(date +%s.%N)"
ids="$(tools submit --port "$UI_PORT" --job scale_aggregates)"
tools wait $ids --timeout 1800
lap "run scale_aggregates" "$t"
[ -f "$RTS_DATA_DIR/report/report.md" ] && say "report written: $RTS_DATA_DIR/report/report.md"

# --- 6. evidence --------------------------------------------------------------------------
say "evidence from Postgres (SQL) and the UI (GraphQL):"
tools evidence --webserver-port "$UI_PORT" --max-runs "$MAX_RUNS" --min-workers 2
echo "timings:"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-34s %6.1f s\n' "total (before shutdown)" "$(echo "$(date +%s.%N) - $T0" | bc)"
say "scale-out demo OK"
