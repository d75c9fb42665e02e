#!/usr/bin/env bash
# Every row of docs/BENCHMARKS.md in one session, one after another (each script starts, stops and reaps its own
# cluster). Output: one JSON line per row in $OUT/<row>.jsonl. BENCH_MAX_WAIT_S bounds each quiet-machine wait.
#
#   benchmarks/run_all.sh            every row
#   benchmarks/run_all.sh headline   only issue 12's targets, each beside its reference in one run (needs
#                                    MindSpore Serving installed: ../shared/peers/mindspore-serving/setup.sh);
#                                    prints their table at the end. HEADLINE_ARGS adds arguments (e.g. --rounds 3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zmserve-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $* (load $(cut -d' ' -f1 /proc/loadavg))"; "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"; echo "   rc=$?"; }
headline() {
  run 0_headline .venv/bin/python -m benchmarks.headline ${HEADLINE_ARGS:-}
  echo; echo "uptime: $(uptime)"; sed -n '/^| # /,$p' "$OUT/0_headline.jsonl"
}
if [ "${1:-all}" = headline ]; then
  headline
  echo "results in $OUT"
  exit 0
fi
headline
run 1_latency_tp2 .venv/bin/python -m benchmarks.latency_tp2 --profile
run 2_batching .venv/bin/python -m benchmarks.batching
run 3_bandwidth .venv/bin/python -m benchmarks.bandwidth --mib 64 --rounds 2
run 4_rank_scaling .venv/bin/python -m benchmarks.rank_scaling
run 7_pipeline_pp2 .venv/bin/python -m benchmarks.pipeline_pp2
run 8_minilm .venv/bin/python -m benchmarks.minilm
run 9_big_model .venv/bin/python -m benchmarks.big_model --duration 30   # ~25 min, ~9 GB of RAM at the peak, 13 GB of exports
run 5_vs_mindspore_serving .venv/bin/python -m benchmarks.peers.mindspore_serving.compare
run 6_ray_serve .venv/bin/python -m benchmarks.peers.ray_serve.bench_ray
run 10_curve_cost .venv/bin/python -m benchmarks.curve_cost --rounds 2
echo "results in $OUT"
