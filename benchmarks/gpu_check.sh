#!/usr/bin/env bash
# The GPU throughput checks in one go, on a machine with a CUDA GPU (about 8 minutes on an H100):
#   bash benchmarks/gpu_check.sh            (results go to $OUT, or benchmarks/gpu-results)
# It needs a CUDA build of torch already installed; the peers (higher, learn2learn) run when installed.
# Every implementation runs on the GPU in its own process; ratios are from the same run.
set -uo pipefail
out=${OUT:-benchmarks/gpu-results}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/device.txt" || exit 1
pip install -q --no-deps -e . >/dev/null 2>&1 || true
impls="mamlkit mamlkit-vmap mamlkit-loop mamlkit-vmap-c8 torch.func loop higher learn2learn"
run() {  # workload iterations [extra flags]
  timeout 150 python benchmarks/throughput.py --device cuda --workload "$1" --iters "$2" --warmup 5 --threads 8 \
    --impls $impls "${@:3}" 2>&1 | tee "$out/$1$3.md"
}
run sinusoid 300
run miniimagenet-5w1s 20
if [ -n "${MAMLKIT_DATA:-}" ] && [ -d "$MAMLKIT_DATA/omniglot" ]; then
  export MAMLKIT_BENCH_DATA="$MAMLKIT_DATA"
  run omniglot-5w1s 50
  run omniglot-20w1s 20
fi
