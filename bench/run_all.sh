#!/usr/bin/env bash
# Run every benchmark one after another (never in parallel: the machine has 2 cores) and print their output.
#   bench/run_all.sh > /tmp/bench.txt
# Needs the servers of scripts/services (PostgreSQL, MariaDB, Redis, NATS) for the outbox and CDC benchmarks;
# the hit, stampede and L1 benchmarks start a private redis-server; bench_peers needs the `bench` extra
# (pip install -e '.[bench]') and uses the Redis at 127.0.0.1:6379 with keys under a unique prefix.
# QUICK=1 bench/run_all.sh: a smoke run of the benchmarks that have --quick (numbers meaningless).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
q=${QUICK:+--quick}
run() { echo "\$ $*"; "$@"; echo; }
run $py bench/bench_hit.py
run $py bench/bench_stampede.py
run $py bench/bench_l1.py
run $py bench/bench_memory.py
run $py bench/bench_outbox.py --db-url postgresql://root@127.0.0.1:5432/test $q
run $py bench/bench_outbox.py --db-url mysql://root@127.0.0.1:3306/test $q
run $py bench/bench_cdc.py --source both $q
run $py bench/bench_audit.py $q
run $py bench/bench_triggers.py
run $py bench/bench_bus.py $q
run $py bench/bench_peers.py $q
run $py bench/bench_mixed.py $q
run $py bench/bench_lua.py
