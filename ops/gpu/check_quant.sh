#!/usr/bin/env bash
# The quantized weights' GPU checks, in one go, for a lent GPU machine's few minutes (issue 17):
# FP8 through torch._scaled_mm, int4 through tinygemm, a quantized tiny Llama 4 on the GPU against the CPU.
# Run from the repository root with a CUDA build of torch and the test extra installed
# (pip install -e '.[test]'); it prints the GPU and exits with pytest's status.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), torch.__version__)'
exec "$PY" -m pytest -q -x tests/workers/test_quant_cuda.py "$@"
