#!/usr/bin/env bash
# Buildbot side of kiln's benchmarks. See README.md beside this file.
#
#   bench/buildbot/run.sh                       # all four scenarios (~4-5 min)
#   bench/buildbot/run.sh failover-kill --trials 10
#   bench/buildbot/run.sh failover-hung
#   bench/buildbot/run.sh makespan --makespan-runs 3
#   bench/buildbot/run.sh master-restart --restart-trials 5
#   bench/buildbot/run.sh --help                # every option of bench.py
#
# Environment:
#   PYTHON               interpreter for the venv (default python3; 3.9+)
#   KILN_BENCH_VENV      venv to create or reuse (default: inside the temporary dir,
#                        removed at the end)
#   KILN_BENCH_KEEP=1    keep the temporary dir (masters' and workers' logs, DBs)
#   KILN_BENCH_PIN_DEPS=0  pin only the three buildbot packages, not their dependencies
#
# Every process started here listens on 127.0.0.1 only and is stopped by pid at
# the end, also when a scenario fails or the run is interrupted.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BB_VERSION=4.3.0
PYTHON=${PYTHON:-python3}

WORK=$(mktemp -d -t kiln-bb.XXXXXX)
VENV=${KILN_BENCH_VENV:-$WORK/venv}
PIDS=$WORK/pids
BENCH_PID=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$BENCH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BENCH_PID" 2>/dev/null || true
  fi
  # whatever bench.py started and did not stop: only processes running in our dir
  if [ -f "$PIDS" ]; then
    while read -r pid; do
      [ -n "$pid" ] || continue
      cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null || true)
      case "$cwd" in
        "$WORK"/*) kill -CONT "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true ;;
      esac
    done < "$PIDS"
  fi
  if [ "${KILN_BENCH_KEEP:-0}" = 1 ]; then
    echo "kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

have_buildbot() {
  [ -x "$VENV/bin/twistd" ] && [ -x "$VENV/bin/buildbot-worker" ] &&
    "$VENV/bin/python" - "$BB_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = sys.argv[1]
sys.exit(0 if all(version(p) == want for p in ("buildbot", "buildbot-worker", "buildbot-www")) else 1)
EOF
}

if ! have_buildbot; then
  echo "creating venv and installing buildbot $BB_VERSION ..." >&2
  "$PYTHON" -m venv "$VENV"
  # The versions this harness was measured with (pip freeze of that venv).
  cat > "$WORK/constraints.txt" <<'EOF'
alembic==1.20.1
attrs==26.1.0
autobahn==26.10.2
Automat==25.4.16
cbor2==6.3.0
cffi==2.1.1
constantly==23.10.4
croniter==7.0.0
cryptography==50.0.2
hyperlink==21.0.0
idna==3.20
Incremental==24.11.0
Jinja2==3.1.6
Mako==1.4.3
MarkupSafe==3.0.4
msgpack==1.2.4
multipart==2.0.1
packaging==26.3
pycparser==3.12
PyJWT==2.15.1
pyOpenSSL==26.4.0
python-dateutil==4.0.0
PyYAML==6.0.4
service-identity==26.1.0
SQLAlchemy==2.1.9
treq==26.7.0
Twisted==26.10.0
txaio==26.6.1
typing_extensions==4.16.0
tzdata==2026.6
ujson==6.1.0
unidiff==1.0.1
zope.interface==8.7
EOF
  constraints=(-c "$WORK/constraints.txt")
  [ "${KILN_BENCH_PIN_DEPS:-1}" = 0 ] && constraints=()
  # buildbot-www is needed: without it the master serves no REST API (/api/v2).
  "$VENV/bin/pip" install -q --disable-pip-version-check "${constraints[@]}" \
    "buildbot==$BB_VERSION" "buildbot-worker==$BB_VERSION" "buildbot-www==$BB_VERSION" >&2
fi

"$VENV/bin/python" "$HERE/bench.py" --bin-dir "$VENV/bin" --workdir "$WORK/run" \
  --pid-file "$PIDS" "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
