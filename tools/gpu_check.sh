#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks in one run, for a machine with a GPU and PyTorch but no
# network (functrain is used from src/, not installed).
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# It runs every test that needs CUDA (the rest skip themselves or were run on the CPU), then
# the optimizer and train-step benchmark sections on the GPU, and writes the logs, the markdown
# tables and the JSON to OUT_DIR (default: gpu_check/).
#
# Python packages the machine lacks (optree, at least) can travel as wheels in .whl/. Fetch them
# where pip works, then pass .whl along with the working tree:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl optree
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/functrain_site .whl/*.whl
    export PYTHONPATH="/tmp/functrain_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name())
EOF
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
    tests/train/test_step_cuda.py tests/grads/test_per_sample_cuda.py tests/optim/test_no_host_reads.py \
    tests/optim/test_vmap_ensemble.py tests/test_sq_norms.py \
    tests/checkpoint tests/logging/test_async_writer.py tests/tools/test_bench.py \
    2>&1 | tee "$out/tests.log"
python3 tools/bench.py --device cuda --check --only optimizer step --json "$out/bench_cuda.json" \
    2>&1 | tee "$out/bench_cuda.md"
