#!/usr/bin/env bash
# MaxText beside the project, for scripts/benchmark_memory.py: .venv-maxtext from requirements/maxtext.txt
# (MaxText 0.2.5's TPU install, 239 packages, locked by scripts/lock.sh at the project's jax, jaxlib and
# libtpu: both stacks compile with one XLA:TPU). Opt-in, not part of scripts/install.sh: the project and its
# tests never import MaxText. Linux x86_64 (libtpu's only wheels), Python 3.12 (the lock's). Made anew when
# its lock changes; the lock's digest is written last, so a failed install is never taken for one.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "scripts/install_maxtext.sh: MaxText's TPU install (libtpu) has wheels for Linux x86_64 alone, not" \
       "$(uname -s) $(uname -m)." >&2
  exit 1
fi
digest="$(lock_digest requirements/maxtext.txt)"
if [ "$(cat .venv-maxtext/lock.sha256 2>/dev/null)" != "$digest" ]; then
  rm -rf .venv-maxtext
  "$(find_python312)" -m venv .venv-maxtext
  .venv-maxtext/bin/python -m pip install --quiet --require-hashes --no-deps --only-binary=:all: \
    -r requirements/maxtext.txt
  echo "$digest" > .venv-maxtext/lock.sha256
fi
.venv-maxtext/bin/python -c "import maxtext, jax, libtpu; print('MaxText in .venv-maxtext: jax', jax.__version__)"
