#!/usr/bin/env bash
# Run every benchmark one after another (never in parallel: the machine has 2 cores) and print their output.
#   bench/run_all.sh > /tmp/bench.txt
# Needs the servers of scripts/services (PostgreSQL, MariaDB, Redis, NATS) for the outbox and CDC benchmarks;
# the hit, stampede and L1 benchmarks start a private redis-server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
run() { echo "\$ $*"; "$@"; echo; }
run $py bench/bench_hit.py
run $py bench/bench_stampede.py
run $py bench/bench_l1.py
run $py bench/bench_memory.py
run $py bench/bench_outbox.py --db-url postgresql://root@127.0.0.1:5432/test
run $py bench/bench_outbox.py --db-url mysql://root@127.0.0.1:3306/test
run $py bench/bench_cdc.py --source both
run $py bench/bench_audit.py
run $py bench/bench_triggers.py
run $py bench/bench_bus.py
