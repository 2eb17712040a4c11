#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py: DPO tokens/s and MFU, HFSampler against batched generate, the
# in-process judge), made to run on a GPU machine that has no network: everything its image lacks
# travels beside the repository in .gpu/ (git-ignored, ~45 MB).
#
#   bash bench/gpu_check.sh --prepare       here, where PyPI answers: fill .gpu/
#   bash bench/gpu_check.sh [--out FILE]    there: install .gpu/wheels, then run the check
#   bash bench/gpu_check.sh --dry-run       any CPU, no .gpu/ needed: tiny shapes, every path once
#
# The wheels are the exact versions this checkout's .venv runs (so the GPU runs the code CI tests),
# for the GPU image's Python (3.12); the image already has torch, accelerate, numpy, pyarrow,
# pandas and the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRIED=(transformers tokenizers huggingface-hub safetensors trl datasets dill multiprocess xxhash
  pydantic pydantic-core annotated-types typing-inspection sqlalchemy google-re2 openai httpx2
  httpcore2 truststore sniffio jiter distro)
TARGET_PYTHON=${GPU_CHECK_PYTHON_VERSION:-3.12}

prepare() {
  local python=.venv/bin/python
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels
  for name in "${CARRIED[@]}"; do
    version=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) ||
      continue # not installed here, so cai does not need it either
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .gpu/wheels "$name==$version" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }
  done
  # SmolLM2's tokenizer (and chat template), read from the embedded GGUF, which does not travel.
  rm -rf .gpu/tokenizer
  "$python" -c 'import sys; from pathlib import Path; from transformers import AutoTokenizer
from tests.tiny_model import cached_smollm2_tokenizer
AutoTokenizer.from_pretrained(cached_smollm2_tokenizer(Path(sys.argv[1]))).save_pretrained(sys.argv[2])' \
    "${TMPDIR:-/tmp}/cai-bench" .gpu/tokenizer
  echo "gpu_check: .gpu/ holds $(ls .gpu/wheels | wc -l) wheels and the tokenizer ($(du -sh .gpu | cut -f1))"
}

if [ "${1:-}" = --prepare ]; then
  prepare
  exit
fi

# The wheels are for the GPU machine, where the checkout travels without its .venv.
if [ -d .gpu/wheels ] && [ ! -x .venv/bin/python ]; then
  site=${TMPDIR:-/tmp}/cai-gpu-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/wheels/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
tokenizer=()
[ -d .gpu/tokenizer ] && tokenizer=(--tokenizer .gpu/tokenizer)
PYTHONUNBUFFERED=1 exec "$python" bench/gpu_check.py "${tokenizer[@]}" "$@"
