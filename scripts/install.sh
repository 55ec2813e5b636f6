#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (current jax releases need it) and installs the project and its tests.
# Python is taken from $PYTHON, else python3.13 / python3.12 / python3 on PATH, else pyenv's newest 3.12+.
set -euo pipefail
cd "$(dirname "$0")/.."

is_new_enough() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && is_new_enough "$candidate"; then
      command -v "$candidate"
      return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -V -r); do
      candidate="$(pyenv root)/versions/$version/bin/python"
      if is_new_enough "$candidate"; then
        echo "$candidate"
        return
      fi
    done
  fi
  echo "No Python >= 3.12 found: install one, or point \$PYTHON at it." >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! is_new_enough .venv/bin/python; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# libtpu (XLA:TPU) for scripts/plan.py --topology, which compiles for TPU slices on this CPU machine: the
# version jax[tpu] pins, beside the environment in .venv-libtpu/ and loaded only by lm/topology.py.
# Installed into .venv, every `import jax` on a machine without a TPU would print libtpu's start-up errors.
# On a platform without libtpu wheels (macOS) the TPU plan and its tests are skipped, saying why.
LIBTPU_REQUIREMENT="$(.venv/bin/python -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')"
if [ "$(cat .venv-libtpu/requirement.txt 2>/dev/null)" != "$LIBTPU_REQUIREMENT" ]; then
  rm -rf .venv-libtpu
  if .venv/bin/python -m pip install --quiet --no-deps --target .venv-libtpu "$LIBTPU_REQUIREMENT"; then
    echo "$LIBTPU_REQUIREMENT" > .venv-libtpu/requirement.txt
  else
    echo "Could not install $LIBTPU_REQUIREMENT: scripts/plan.py --topology and its tests are unavailable." >&2
    rm -rf .venv-libtpu
  fi
fi

# transformers, for the tests that compare converted checkpoints with it (tests/test_convert_hf.py), in
# its own venv: the project never imports torch. Python 3.11, the Python of the CPU build of torch 2.13.0
# that pip finds in this machine's wheel directory (elsewhere pip downloads torch 2.13.0 from PyPI).
HF_REQUIREMENTS="torch==2.13.0 transformers==5.23.0 safetensors numpy"
find_python311() {
  for candidate in "${HF_PYTHON:-}" python3.11; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare | grep -E '^3\.11(\.[0-9]+)?$' | sort -V -r); do
      echo "$(pyenv root)/versions/$version/bin/python"
      return
    done
  fi
  echo "No Python 3.11 found for .venv-hf (the transformers reference of the tests): install one, or point \$HF_PYTHON at it." >&2
  exit 1
}
if [ ! -f .venv-hf/requirements.txt ] || [ "$(cat .venv-hf/requirements.txt)" != "$HF_REQUIREMENTS" ]; then
  rm -rf .venv-hf
  "$(find_python311)" -m venv .venv-hf
  .venv-hf/bin/python -m pip install --quiet $HF_REQUIREMENTS
  echo "$HF_REQUIREMENTS" > .venv-hf/requirements.txt
fi
