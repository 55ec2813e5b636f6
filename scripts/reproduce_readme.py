"""The README's figures of the default run, reproduced from scratch: its first command trained again in a
temporary workdir and data directory (the tokenizer trained and the corpus prepared anew), and the losses it
quotes compared at the precision it quotes them. Run by scripts/lock.sh after a change of the locks.

  .venv/bin/python scripts/reproduce_readme.py [--keep=DIR]

Exit 0 when every quoted loss is reproduced, 1 otherwise (a table of quoted against measured either way).
The corpus is the running Python's standard library: the README quotes Python 3.13's.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.training.metrics import read_jsonl  # noqa: E402

# "train loss 6.30 at step 10 and 5.11 at step 100, eval loss 5.36 at step 50 and 5.02 at step 100"
QUOTE = re.compile(r"(train|eval) loss (\d+\.\d+) at step (\d+) and (\d+\.\d+) at step (\d+)")
PYTHON = (3, 13)


def quoted(readme: str) -> dict[tuple[str, int], str]:
  """{(collection, step): loss as the README writes it} of the default run's paragraph."""
  found = {}
  for collection, a, step_a, b, step_b in QUOTE.findall(" ".join(readme.split())):
    found[(collection, int(step_a))] = a
    found[(collection, int(step_b))] = b
  if not found:
    raise SystemExit("README.md quotes no 'train loss X at step N and Y at step M' figures")
  return found


def train(workdir: str) -> float:
  command = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/default.py",
             f"--workdir={workdir}", f"--config.data.data_dir={os.path.join(workdir, 'data')}"]
  print("$", " ".join(command), flush=True)
  start = time.perf_counter()
  subprocess.run(command, cwd=ROOT, check=True)
  return time.perf_counter() - start


def compare(expected: dict[tuple[str, int], str], workdir: str) -> list[str]:
  """The table's lines; each differing figure's line ends in 'DIFFERS'."""
  lines = []
  for (collection, step), text in sorted(expected.items()):
    logged = read_jsonl(workdir, collection).get(step, {}).get("loss")
    measured = "missing" if logged is None else f"{logged:.{len(text.split('.')[1])}f}"
    lines.append(f"  {collection} loss at step {step:>3}: README {text}, measured {measured}"
                 + ("" if measured == text else "  DIFFERS"))
  return lines


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--keep", help="train in this directory and keep it (default: a temporary one)")
  args = parser.parse_args()
  with open(os.path.join(ROOT, "README.md")) as f:
    expected = quoted(f.read())
  if sys.version_info[:2] != PYTHON:
    print(f"Note: the README's figures are of Python {'.'.join(map(str, PYTHON))}'s standard library; this is "
          f"Python {sys.version.split()[0]}, whose corpus differs.")
  with tempfile.TemporaryDirectory() as scratch:
    workdir = args.keep or scratch
    seconds = train(workdir)
    lines = compare(expected, workdir)
  print(f"The README's default run, reproduced in {seconds / 60:.1f} min:")
  print("\n".join(lines))
  differs = sum(line.endswith("DIFFERS") for line in lines)
  print("Every quoted figure reproduced." if not differs else f"{differs} quoted figure(s) differ.")
  return 1 if differs else 0


if __name__ == "__main__":
  sys.exit(main())
