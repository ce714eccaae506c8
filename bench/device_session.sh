#!/usr/bin/env bash
# One visit to a lent GPU machine (no package index there): install the carried wheels, then run
# bench/gpu.py (JSON record) and the GPU tests, logs under $OUT. Wheels: onnxruntime-gpu already installed
# into /root/site by ../shared/tools/carry-wheel-parts' calls; .whl/ holds diffusers, onnx-graphsurgeon,
# importlib-metadata (pip download --no-deps ... -d .whl, see the device README).
#   bash bench/device_session.sh BENCH_SECONDS TEST_SECONDS [PYTEST -k EXPRESSION]
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/*.whl
export PYTHONPATH=/root/site:$PWD
# onnxruntime-gpu finds CUDA and cuDNN where torch's wheels put them.
LD_LIBRARY_PATH=$(python3 -c "import nvidia, os; print(':'.join(sorted({r for p in nvidia.__path__ \
  for r, _, fs in os.walk(p) if any('.so' in f for f in fs)})))"):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The record is named by the GPU found (e.g. gpu-nvidia-h200.json), not by the one seen last time.
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
timeout "${1:-330}" python3 bench/gpu.py --out "$OUT/gpu-${GPU:-unknown}.json" 2>&1 | grep -v "kept in float32" \
  | tee "$OUT/bench.log"
cp /tmp/pnp-trt-bench-sd21-fp16.log "$OUT/export.log" 2>/dev/null
timeout "${2:-150}" python3 -m pytest -q -rs -s -m gpu -p no:cacheprovider -k "${3:-gpu}" \
  tests/test_gpu_cuda_graphs.py tests/test_gpu_torch.py 2>&1 | grep -v "kept in float32" | tee "$OUT/tests.log"
