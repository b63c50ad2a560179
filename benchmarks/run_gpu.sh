#!/usr/bin/env bash
# One short run on a GPU machine: the GPU tests, then the benchmark. Installs nothing.
#
#   bash benchmarks/run_gpu.sh OUTDIR
#
# Writes into OUTDIR: env.txt (card, driver, versions), gpu_tests.txt (pytest of tests/test_hf_gpu.py),
# gpu.json and gpu_table.md (benchmarks/gpu.py), gpu_bench.log, and status.txt (the exit codes).
# Python: $PYTHON, else .venv/bin/python, else python3. Budget: about 1 minute of tests (3 at most)
# and at most 5 minutes of benchmark (it skips what is left past 270 s of its own).
set -u
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "python: $PY"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import torch, transformers, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1
} > "$OUT/env.txt"

timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_hf_gpu.py > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
timeout 330 "$PY" benchmarks/gpu.py --out "$OUT/gpu.json" > "$OUT/gpu_table.md" 2> "$OUT/gpu_bench.log"
bench_rc=$?

{ echo "gpu_tests_exit=$tests_rc"; echo "benchmark_exit=$bench_rc"; } > "$OUT/status.txt"
cat "$OUT/status.txt"
tail -n 3 "$OUT/gpu_tests.txt"
cat "$OUT/gpu_table.md"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
