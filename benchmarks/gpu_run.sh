#!/usr/bin/env bash
# Every GPU measurement in one short run (benchmarks/gpu_run.py says what each stage measures):
#   benchmarks/gpu_run.sh            on a machine with one CUDA GPU, about 9 minutes; records and models under $OUT
#   benchmarks/gpu_run.sh --smoke    the same code path on a CPU in a few minutes
# Any further arguments go to benchmarks/gpu_run.py (--stages, --budget-s, --pneumonia-samples, --out).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python_bin="$repo/.venv/bin/python"; else python_bin=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$repo"
exec "$python_bin" benchmarks/gpu_run.py "$@"
