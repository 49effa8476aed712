#!/usr/bin/env bash
# Issue 14's measurements that need a CPU with fast bf16 (AMX or AVX-512 bf16), in one go, from the repository root:
#   LIGHTNING_DISTILL_DATA=../shared/datasets bash benchmarks/bf16_cpu_session.sh check speed methods ipc10
# Stages run in the order given; each writes its stamped result to benchmarks/results/ (or $OUT when set). On a CPU
# without bf16 instructions the policy resolves fp32 and `check` stops the script, so nothing is recorded as bf16.
# Durations on a 2-core Xeon (estimates from the rows already measured there): speed about 10 min, methods about
# 10 min, ipc10 about 2 h (the recipe and its two-member variant distilled side by side for 28 minutes each, then
# scored on the validation split).
set -euo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=offline OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
OUT_ARGS=()
if [ -n "${OUT:-}" ]; then OUT_ARGS=(--out "$OUT"); fi
TAG=${TAG:-xeon}

ipc10_sweep() {  # ipc10_sweep OUT_DIR --only NAME   (or: --merge JSON JSON, to write the merged table)
  local out=$1; shift
  # Scored with the paper's krr network (width 128), where sets from different seeds agree within 0.1 (fp32, AMD).
  "$PY" benchmarks/sweep.py recipes/frepo/mnist_ipc10_cpu_bf16.yaml --minutes 28 --repeats 2 --threads 1 \
    --option 'members2 --model.init_args.members_per_step=2' \
    --name "sweep_frepo_mnist_ipc10_cpu_bf16_members_$TAG" ${out:+--out "$out"} "$@"
}

for stage in "${@:-check}"; do
case "$stage" in
check)  # what the policy resolves to here; stop unless it is bf16
  "$PY" - <<'EOF'
import sys
from lightning_distill.precision import PrecisionPolicy
p = PrecisionPolicy("auto").bind("cpu")
print(f"policy: {p.dtype} ({p.reason})")
sys.exit(0 if p.bf16 else "the stages after `check` need a CPU where the policy resolves bf16 (AMX or AVX-512 bf16)")
EOF
  ;;
speed)  # the issue's benchmark: FRePo's official step at IPC 1/10/50, fp32 and the policy interleaved
  "$PY" benchmarks/speed.py --precision fp32,policy --methods FRePo --ipcs 1 10 50 --inputs "28px grey" \
    --profile official --threads 1 --name "speed_precision_ipc1_10_50_$TAG" "${OUT_ARGS[@]}"
  ;;
methods)  # every other method's row under the policy, CPU profile (MemoriesBPTT's has not been measured on bf16)
  "$PY" benchmarks/speed.py --precision fp32,policy --methods MemoriesBPTT APM RCIG RandomSubset --ipcs 1 10 \
    --inputs "28px grey" --profile cpu --threads 1 --name "speed_methods_precision_$TAG" "${OUT_ARGS[@]}"
  ;;
ipc10)  # MNIST IPC 10 at the paper's pool size under bf16: one pool member a step against two, 28 minutes each
  mkdir -p runs && tmp=$(mktemp -d runs/bf16_session.XXXX)
  ipc10_sweep "$tmp/a" --only base >"$tmp/a.log" 2>&1 &
  ipc10_sweep "$tmp/b" --only members2 >"$tmp/b.log" 2>&1
  wait
  name="sweep_frepo_mnist_ipc10_cpu_bf16_members_$TAG.json"
  ipc10_sweep "${OUT:-}" --merge "$tmp/a/$name" "$tmp/b/$name"
  echo "Score the winner on the test split with the paper's network (2 seeds): lightning-distill evaluate" \
    "runs/bench/sweep_frepo_mnist_ipc10_cpu_bf16_members_$TAG/<run>/distilled.pt --protocol krr --repeats 1"
  ;;
*) echo "usage: $0 [check] [speed] [methods] [ipc10]" >&2; exit 2 ;;
esac
done
