#!/usr/bin/env bash
# The GPU check, one script, at most 8 minutes on one GPU: the `cuda` tests, then bench/bench_gpu.py's figures
# (training loop vs bare model at 320 and 480 px, embedding, faiss-gpu vs CPU, peak GPU memory), each a ratio
# measured in this run. Every line that reports starts with "ROW"; without CUDA each GPU row says "skipped: no CUDA".
#
#   bash bench/gpu_check.sh                     # a GPU box: the venv of `make setup GPU=1` (.venv/bin/python)
#   PYTHON=python3 bash bench/gpu_check.sh      # any Python that already holds a CUDA torch
#
# A lent device machine (the `device` tool) has torch, timm, numpy, pandas, scikit-learn, opencv, no faiss and no
# network. The project's other needs travel as wheels in .whl/ (ignored by git, named in the run's carry), which
# this script installs into /tmp/site first; made here, 19.4 MB in all:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0 pycocotools==2.0.11
# faiss-gpu does not travel: faiss-gpu-cu12's wheel alone is 48 MB, and it needs CUDA 12's cuBLAS and runtime
# (nvidia-cublas-cu12, hundreds of MB) beside the machine's CUDA 13, so there the faiss-gpu rows say that the faiss
# they found has no GPU.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
start=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        && echo "ROW wheels: installed $(ls .whl/*.whl | wc -l) from .whl into /tmp/site" \
        || echo "ROW wheels: failed to install .whl/*.whl"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project itself, where it is not installed (-e .)

"$PY" - <<'EOF'
import importlib.util
import sys

import torch

cuda = torch.cuda.is_available()
gpu = f"{torch.cuda.get_device_name(0)}, cc {'.'.join(map(str, torch.cuda.get_device_capability(0)))}" if cuda else "none"
print(f"ROW python: {sys.executable} {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"GPU: {gpu}")
missing = [m for m in ("timm", "faiss", "pytorch_metric_learning", "pycocotools", "sklearn", "PIL", "tqdm")
           if importlib.util.find_spec(m) is None]
faiss_gpus = "n/a"
if "faiss" not in missing:
    import faiss
    faiss_gpus = faiss.get_num_gpus()
print(f"ROW packages: {'missing ' + ', '.join(missing) if missing else 'all found'}; faiss sees {faiss_gpus} GPU(s)")
EOF

# the cuda tests: each one that cannot run here prints its one-line reason (-rs)
timeout 180 "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py 2>&1 | tee /tmp/gpu_check_tests.log | tail -n 25
summary=$(grep -E "passed|failed|skipped|error" /tmp/gpu_check_tests.log | tail -n 1)
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "ROW cuda tests: ${summary:-no summary (timed out?)}"
else
    echo "ROW cuda tests: skipped: no CUDA (pytest: ${summary:-no summary})"
fi

timeout 330 "$PY" bench/bench_gpu.py || echo "ROW bench: ended with status $? (124: past its 330 s)"
echo "ROW gpu_check: done in $(($(date +%s) - start)) s"
