# Sourced by scripts/install.sh, scripts/install_maxtext.sh and scripts/lock.sh: the interpreters of the
# locked environments.

is_new_enough() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

# Python >= 3.12 (current jax releases need it): $PYTHON, else python3.13 / python3.12 / python3 on PATH,
# else pyenv's newest 3.12+. The README's figures were measured on Python 3.13 (its standard library is the
# default corpus).
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

# Python 3.$1 exactly ($2, an override, first): python3.$1 on PATH, else pyenv's newest 3.$1.
find_python_exactly() {
  for candidate in "${2:-}" "python3.$1"; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, $1))" >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare | grep -E "^3\.$1(\.[0-9]+)?\$" | sort -V -r); do
      echo "$(pyenv root)/versions/$version/bin/python"
      return
    done
  fi
  return 1
}

# Python 3.11 for .venv-hf: the Python of the CPU build of torch that requirements/hf.txt locks.
find_python311() {
  find_python_exactly 11 "${HF_PYTHON:-}" && return
  echo "No Python 3.11 found for .venv-hf (the transformers reference of the tests): install one, or point \$HF_PYTHON at it." >&2
  exit 1
}

# Python 3.12 for .venv-maxtext: the Python requirements/maxtext.txt is locked for (MaxText's pytype has no
# wheel for 3.13).
find_python312() {
  find_python_exactly 12 "${PYTHON312:-}" && return
  echo "No Python 3.12 found for .venv-maxtext (MaxText's lock): install one, or point \$PYTHON312 at it." >&2
  exit 1
}

# The sha256 of the given files together: a venv made from a lock keeps it, and is made anew when it changes.
lock_digest() {
  cat "$@" | sha256sum | cut -d' ' -f1
}

# The blocks of the named packages in a lock (a requirement line with its hashes), for a first install of
# the build tools that the lock's source distributions (promise) are then built with, offline.
lock_blocks() {
  local lock="$1"; shift
  local names="$*"
  awk -v names=" $names " '/^[^ #]/ { split($1, p, "=="); keep = index(names, " " p[1] " ") > 0 } keep' "$lock"
}
