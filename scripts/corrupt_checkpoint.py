"""Flips random bits in a saved checkpoint step, one at a time, and checks that each is detected.

  python scripts/corrupt_checkpoint.py --checkpoint_dir=runs/default/checkpoints [--step=200] [--flips=40]

Each trial flips one bit at a random position of a random file of the step (files drawn by size, so the
array data takes most flips), runs the verification a restore runs (`lm.checkpoints.checkpoint.verify`: every file
against the step's checksums.json), and flips the bit back. Prints every trial and then
`corruptions: N tried, D detected, A accepted`; exits 1 when any flip was accepted. The step is left as it
was (each flip is undone, also on Ctrl-C).
"""

import os
import random
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.checkpoints import integrity  # noqa: E402

_DIR = flags.DEFINE_string("checkpoint_dir", None, "A run's checkpoint directory (<workdir>/checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "The step to corrupt; the newest by default.")
_FLIPS = flags.DEFINE_integer("flips", 40, "Bits to flip, one per trial.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the positions.")
flags.mark_flag_as_required("checkpoint_dir")


def _flip(path: str, bit: int) -> None:
  with open(path, "r+b") as f:
    f.seek(bit // 8)
    byte = f.read(1)[0]
    f.seek(bit // 8)
    f.write(bytes([byte ^ (1 << (bit % 8))]))


def trial(step_dir: str, files: list[str], rng: random.Random) -> tuple[str, int, bool]:
  """(file, bit, detected) of one flip, undone afterwards."""
  sizes = [os.path.getsize(f) for f in files]
  path = rng.choices(files, weights=sizes)[0]
  bit = rng.randrange(os.path.getsize(path) * 8)
  _flip(path, bit)
  try:
    integrity.verify(step_dir)
    detected = False
  except integrity.Corrupt:
    detected = True
  finally:
    _flip(path, bit)
  return path, bit, detected


def main(argv):
  del argv
  steps = sorted(int(n) for n in os.listdir(_DIR.value) if n.isdigit())
  if not steps:
    sys.exit(f"corrupt_checkpoint.py: no checkpoint step in {_DIR.value}.")
  step = steps[-1] if _STEP.value is None else _STEP.value
  step_dir = os.path.join(_DIR.value, str(step))
  if not integrity.verify(step_dir):
    sys.exit(f"corrupt_checkpoint.py: {step_dir} has no {integrity.MANIFEST} (saved before checksums "
             "existed): nothing to check against.")
  files = [os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names
           if n != integrity.MANIFEST and os.path.getsize(os.path.join(root, n))]
  rng = random.Random(_SEED.value)
  detected = 0
  for i in range(_FLIPS.value):
    path, bit, found = trial(step_dir, files, rng)
    detected += found
    print(f"{i + 1:3d} {os.path.relpath(path, step_dir)} bit {bit:,}: {'detected' if found else 'ACCEPTED'}")
  integrity.verify(step_dir)  # every flip undone
  print(f"corruptions: {_FLIPS.value} tried, {detected} detected, {_FLIPS.value - detected} accepted")
  sys.exit(0 if detected == _FLIPS.value else 1)


if __name__ == "__main__":
  app.run(main)
