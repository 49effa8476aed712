#!/usr/bin/env bash
# The GPU checks of one lent device session (issue 14), run from the repository root on the GPU machine:
#   bash benchmarks/gpu_session.sh tests speed methods profile pooladam sweep   # any of the stages below, in order
# It expects what the device tool carries: wheels of the packages the GPU image lacks in .whl/, MNIST's raw idx files
# gzipped in .gpudata/MNIST/raw/ (sweep only), and $OUT (a folder whose files come back). LIGHTNING_DISTILL_COMMIT
# names the commit the tree is a copy of (a copy's own .git, if any, may be stale), for the result stamps.
# The image (torch 2.11, lightning 2.6.6, torchmetrics, matplotlib, scipy) lacked, on 2026-12-06: kornia, kornia_rs,
# jsonargparse, docstring_parser, typeshed_client and pytorch_optimizer. Fetch them here (Python 3.12, manylinux):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     kornia==0.9.0 kornia_rs==0.2.0 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 \
#     pytorch_optimizer==4.1.0
# and gzip MNIST: mkdir -p .gpudata/MNIST/raw; for f in ../shared/datasets/MNIST/raw/*; do
#   gzip -c "$f" >".gpudata/MNIST/raw/$(basename "$f").gz"; done     (both folders are git-ignored; carry them)
# Measured on an H100 on 2026-12-06: tests about 35 s, speed about 60 s; methods with MemoriesBPTT's official
# IPC 50 does not fit 240 s (3.3 s a step), hence IPC 1 and 10 there.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print(torch.__version__)"; } \
  >"$OUT/gpu.txt" 2>&1

for stage in "${@:-tests}"; do
case "$stage" in
tests)  # the CUDA tests: the policy, every method's fit and export, evaluation on the GPU
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  ;;
speed)  # the issue's benchmark: FRePo, official configuration, 28 px, IPC 1/10/50, fp32 and the policy interleaved
  timeout 150 python3 benchmarks/speed.py --device cuda --precision fp32,policy --methods FRePo --ipcs 1 10 50 \
    --inputs "28px grey" --profile official --steps 10 --out "$OUT" --name speed_precision_h100 2>&1 | tail -30
  ;;
methods)  # the other methods' rows (MemoriesBPTT's official step takes seconds: IPC 1 and 10 only)
  timeout 150 python3 benchmarks/speed.py --device cuda --precision fp32,policy --ipcs 1 10 --inputs "28px grey" \
    --methods APM RCIG MemoriesBPTT RandomSubset --profile official --steps 3 --out "$OUT" \
    --name speed_methods_precision_h100 2>&1 | tail -30
  ;;
profile)  # where FRePo's GPU step goes, under each precision
  timeout 90 python3 benchmarks/speed.py --device cuda --precision fp32,policy --methods FRePo --ipcs 10 \
    --inputs "28px grey" --profile official --steps 5 --profile-top 15 --out "$OUT" --name speed_profile_h100 \
    2>&1 | tail -60
  ;;
pooladam)  # the pool's online Adam: single-tensor against fused (the default on CUDA since it landed), whole steps
  timeout 150 python3 benchmarks/pool_adam.py --device cuda --ipcs 1 10 50 --profile official --steps 20 \
    --out "$OUT/pool_adam_h100" 2>&1 | tail -10
  ;;
sweep)  # FRePo MNIST IPC 10 at the paper's size: bf16 against fp32 at equal minutes, scored on validation
  mkdir -p /tmp/data/MNIST/raw
  for f in .gpudata/MNIST/raw/*.gz; do gunzip -c "$f" >"/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
  export LIGHTNING_DISTILL_DATA=/tmp/data
  timeout 420 python3 benchmarks/sweep.py recipes/frepo/mnist_ipc10_cpu_bf16.yaml --minutes "${MINUTES:-1.25}" \
    --repeats 2 --option 'bf16 --model.init_args.compile_features=false' \
    --option 'fp32 --model.init_args.compile_features=false --model.init_args.precision=fp32' --only bf16 fp32 \
    --out "$OUT" --name sweep_frepo_mnist_ipc10_h100_bf16_vs_fp32 2>&1 | tail -60
  ;;
*) echo "usage: $0 [tests] [speed] [methods] [profile] [pooladam] [sweep]" >&2; exit 2 ;;
esac
done
