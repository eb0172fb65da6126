#!/usr/bin/env bash
# The GPU checks of issues 9 and 10 in one call of the device machine (one H200, 16 cores):
#   1. preflight: a tiny Dreamer and a tiny TWISTER run on atari/Breakout on the GPU, each
#      through a checkpoint, a resume and `flatworld eval`; the script stops here if either
#      fails, so a broken build costs seconds of GPU time, not minutes;
#   2. benchmarks/dreamer_throughput.py on CUDA, fp32 and bf16 (JSON; BENCH=0 skips it);
#   2b. benchmarks/gpu_graphs.py: the update replayed as CUDA graphs against the eager update
#      (the same numbers? how much faster?); an agent whose sequence model passes (with Adam)
#      learns with --cuda-graphs, otherwise eagerly (CHECK_GRAPHS=0 skips the check);
#   3. learning: Dreamer S and TWISTER S on atari/Breakout at the published settings (train
#      ratio 1024: one update per agent step), sharing the GPU (RUNS= sets other runs), each
#      stopped by --time-limit-s at an episode end; then `flatworld eval` (10 episodes, the
#      Atari-100k protocol) on each run's last checkpoint.
# Everything it writes lands in $OUT: log.txt, throughput.json, graphs.json, eval.json and
# runs.tar.gz (each run's config.yaml and metrics.csv).
#
# On the device machine, with gymnasium's, ale-py's and farama-notifications' wheels from
# ../shared/gpu/make-wheels.sh carried in .whl/ (nothing else: atari/ needs no MuJoCo):
#   bash benchmarks/gpu_atari.sh
# (The run in docs/results/h200-*.json installed every wheel of make-wheels.sh and set MUJOCO_GL=egl first,
# before flatworld.envs stopped importing dm_control for atari/ ids.)
# Here, a CPU rehearsal of the script itself (tiny runs, minutes):
#   OUT=/tmp/gpu-out INSTALL_WHEELS=0 DEVICE=cpu PY=.venv/bin/python LIMIT=20 SIZE=XS RUNS="d dreamer 1" \
#     BENCH_ARGS=--quick GRAPHS_ARGS="--quick --batch 4 --seq-len 16 --repeats 3" PRE_STEPS=1200 \
#     LEARN_ARGS="--batch-size 2 --seq-len 8 --train-ratio 4" bash benchmarks/gpu_atari.sh
set -u
: "${OUT:?set OUT to the folder for the results}"
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
LIMIT=${LIMIT:-480}     # seconds of training per learning run, at most (see BUDGET)
BUDGET=${BUDGET:-570}   # seconds the whole call may take (the device allows 600 a call): the
                        # learning runs get what the steps before them left, less 100 s for
                        # their start-up, the last episode and the evaluation
SIZE=${SIZE:-S}         # model size of the learning runs
GAME=${GAME:-atari/Breakout}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }

if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then  # gymnasium, ale-py (ROMs inside)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/gymnasium-*.whl .whl/ale_py-*.whl .whl/farama_notifications-*.whl \
    || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
fw() { "$PY" -m flatworld "$@"; }
runs=/tmp/gpu-runs
rm -rf "$runs" && mkdir -p "$runs"
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" -c "import torch, ale_py; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ale_py', ale_py.__version__)"

stamp "1. preflight"
PRE=${PRE_STEPS:-1400}
tiny="--model-size XS --batch-size 4 --seq-len 16 --train-ratio 16 --steps $PRE --seed-steps 1024
      --log-every 100 --eval-every $PRE --eval-episodes 1 --diag-every 100 --checkpoint-every 100
      --no-progress --device $DEVICE --env $GAME"
pids=()
for agent in dreamer twister; do
  # stopped by its time limit at episode ends, and resumed until it is done
  (fw train "$agent" $tiny --run-dir "$runs/pre-$agent" --time-limit-s 4 &&
   for _ in 1 2 3 4 5 6 7 8; do
     [ "$(tail -n 1 "$runs/pre-$agent/metrics.csv" | cut -d, -f1)" = "$PRE" ] && break
     fw train --resume "$runs/pre-$agent" --no-progress || exit 1
   done &&
   fw eval "$runs/pre-$agent" --episodes 1 >"$runs/pre-$agent.json") &
  pids+=($!)
done
ok=1
for p in "${pids[@]}"; do wait "$p" || ok=0; done
for agent in dreamer twister; do
  tail -n 2 "$runs/pre-$agent/metrics.csv" 2>/dev/null | cut -c1-200; cat "$runs/pre-$agent.json" 2>/dev/null
done
if [ "$ok" != 1 ]; then stamp "preflight FAILED: stopping"; exit 1; fi

if [ "${BENCH:-1}" = 1 ]; then  # BENCH=0: skip it (docs/results/speed/h200-* holds one run of it)
  stamp "2. throughput"
  OMP_NUM_THREADS=8 timeout 100 "$PY" benchmarks/dreamer_throughput.py --devices "$DEVICE" \
    --precision fp32 bf16 --threads 8 ${BENCH_ARGS:---repeats 3} >"$OUT/throughput.json" ||
    stamp "throughput failed"
fi

graphs_for() { echo ""; }  # the learning runs' --cuda-graphs flag, per agent
if [ "${CHECK_GRAPHS:-1}" = 1 ]; then  # CHECK_GRAPHS=0: eager updates, no check
  stamp "2b. CUDA graphs against the eager update (benchmarks/gpu_graphs.py)"
  OMP_NUM_THREADS=8 timeout 180 "$PY" benchmarks/gpu_graphs.py --device "$DEVICE" \
    ${GRAPHS_ARGS:-} >"$OUT/graphs.json" || stamp "graphs check: not every case passed"
  # An agent gets --cuda-graphs only if its sequence model passed with Adam (the runs' optimizer).
  graphs_for() {
    "$PY" -c 'import json, sys
key = {"dreamer": "rssm-adam", "twister": "transformer-adam"}[sys.argv[2]]
try:
    ok = json.load(open(sys.argv[1])).get(key, {}).get("ok") is True
except (OSError, ValueError):
    ok = False
print("--cuda-graphs" if ok else "")' "$OUT/graphs.json" "$1"
  }
fi

# name, agent, seed and extra flags of each run; "r256": train ratio 256 (an update every 4
# agent steps), four times the env steps of the published 1024 for the same updates. Two runs
# by default: with graphs each update is short, and fewer processes share the GPU's time.
RUNS=${RUNS:-"dreamer-s1 dreamer 1 ;twister-s1 twister 1"}
left=$((BUDGET - ($(date +%s) - t0) - 100))
if [ "$left" -lt "$LIMIT" ]; then
  LIMIT=$((left > 20 ? left : 20))
fi
stamp "3. learning ($SIZE, $GAME, ${LIMIT} s each; dreamer: $(graphs_for dreamer || true), twister: $(graphs_for twister || true))"
names=() pids=()
while IFS=' ' read -r name agent seed extra; do
  [ -n "$name" ] || continue
  names+=("$name")
  OMP_NUM_THREADS=3 fw train "$agent" --env "$GAME" --model-size "$SIZE" --seed "$seed" \
    --steps 100000 --time-limit-s "$LIMIT" --eval-every 2000 --eval-episodes 5 \
    --diag-every 2000 --log-every 500 --device "$DEVICE" --no-progress \
    --run-dir "$runs/$name" $(graphs_for "$agent") ${LEARN_ARGS:-} $extra >"$runs/$name.log" 2>&1 &
  pids+=($!)
done <<<"$(tr ';' '\n' <<<"$RUNS")"
for p in "${pids[@]}"; do wait "$p" || stamp "a learning run failed"; done  # not the tee
stamp "evaluating"
pids=()
for name in "${names[@]}"; do
  tail -n 3 "$runs/$name.log"
  OMP_NUM_THREADS=3 fw eval "$runs/$name" --episodes 10 >"$runs/$name.eval.json" \
    2>"$runs/$name.eval.err" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
sep="{"
for name in "${names[@]}"; do
  cat "$runs/$name.eval.err"
  printf '%s"%s": %s\n' "$sep" "$name" "$(cat "$runs/$name.eval.json" || echo null)" \
    >>"$OUT/eval.json"
  sep=","
done
echo "}" >>"$OUT/eval.json"
tar czf "$OUT/runs.tar.gz" -C "$runs" --exclude=checkpoints --exclude=tb .
stamp "done"
