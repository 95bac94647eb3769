#!/bin/sh
# The README's test command beside a CPU hog that keeps every core busy: a test that
# only passes on an idle machine fails here. Usage:
#   scripts/run_tests_under_load.sh [pytest args...]   (default: the whole suite)
#   HOGS=4 scripts/run_tests_under_load.sh tests/server/test_load.py
# HOGS busy-looping processes (default: one per CPU) run at the tests' priority for
# the whole run and are stopped (by their pids) when it ends, however it ends.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
HOGS=${HOGS:-$(nproc)}
pids=""
stop_hogs() {
    for pid in $pids; do kill "$pid" 2>/dev/null; done
    for pid in $pids; do wait "$pid" 2>/dev/null; done
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM
i=0
while [ "$i" -lt "$HOGS" ]; do
    "$PYTHON" -c 'while True: pass' &
    pids="$pids $!"
    i=$((i + 1))
done
echo "run_tests_under_load: $HOGS CPU hogs (pids$pids); load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$PYTHON" -m pytest "$@"
status=$?
echo "run_tests_under_load: pytest exit $status; load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exit $status
