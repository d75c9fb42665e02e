#!/usr/bin/env bash
# Every row of docs/BENCHMARKS.md in one session, one after another (each script starts, stops and reaps its own
# cluster). Output: one JSON line per row in $OUT/<row>.jsonl. BENCH_MAX_WAIT_S bounds each quiet-machine wait.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zmserve-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $* (load $(cut -d' ' -f1 /proc/loadavg))"; "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.err"; echo "   rc=$?"; }
run 1_latency_tp2 .venv/bin/python benchmarks/latency_tp2.py --profile
run 2_batching .venv/bin/python benchmarks/batching.py
run 3_bandwidth .venv/bin/python benchmarks/bandwidth.py --mib 64 --rounds 2
run 4_rank_scaling .venv/bin/python benchmarks/rank_scaling.py
run 7_pipeline_pp2 .venv/bin/python benchmarks/pipeline_pp2.py
run 8_minilm .venv/bin/python benchmarks/minilm.py
run 5_vs_mindspore_serving .venv/bin/python benchmarks/peers/mindspore_serving/compare.py
run 6_ray_serve .venv/bin/python benchmarks/peers/ray_serve/bench_ray.py
run 10_curve_cost .venv/bin/python benchmarks/curve_cost.py --rounds 2
echo "results in $OUT"
