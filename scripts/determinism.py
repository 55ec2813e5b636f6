"""The determinism experiment: one run, five splits of its global batch of 64 sequences.

  python scripts/determinism.py --steps=100 --workdir=runs/determinism
  python scripts/determinism.py --steps=100 --learning_rate=1e-3 --workdir=runs/determinism_lr1e-3

Each split (micro_batch_size, gradient_accumulation_steps, devices) trains the same small float32 model
from configs/default.py (smaller) in its own process, with that many simulated CPU devices. Prints a
markdown table: loss at steps 1/10/last, the largest loss difference over all steps and the relative
L2 difference of the final parameters against the first split, validation loss, and tokens/s.
"""

import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm.training import metrics  # noqa: E402

SPLITS = [(64, 1, 1), (16, 4, 1), (8, 1, 8), (2, 4, 8), (1, 8, 8)]
MODEL = ["--config.model.d_model=128", "--config.model.num_layers=2", "--config.model.num_heads=4",
         "--config.model.num_kv_heads=2", "--config.model.head_dim=32", "--config.model.mlp_dim=384",
         "--config.model.max_seq_len=128", "--config.train.seq_len=128"]

_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps of every run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/determinism", "One subdirectory per split goes here.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Peak learning rate; default configs/default.py's.")


def run_split(split, workdir: str, steps: int, learning_rate: float | None) -> None:
  micro_batch_size, accumulation, devices = split
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TF_CPP_MIN_LOG_LEVEL="2")
  args = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/default.py",
          f"--workdir={workdir}", *MODEL, f"--config.train.micro_batch_size={micro_batch_size}",
          f"--config.train.gradient_accumulation_steps={accumulation}",
          f"--config.train.num_train_steps={steps}", "--config.train.log_interval_steps=1",
          f"--config.train.eval_interval_steps={steps}", f"--config.train.save_interval_steps={steps}",
          "--config.mesh.data=-1"]
  if learning_rate is not None:
    args.append(f"--config.train.learning_rate={learning_rate}")
  subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def final_params(workdir: str, step: int):
  import jax
  from lm.checkpoints import checkpoint
  state = checkpoint.restore_on_one_device(os.path.join(os.path.abspath(workdir), "checkpoints",
                                                        str(step), "state"))
  return jax.tree.leaves(state["params"])


def relative_l2(a, b) -> float:
  import numpy as np
  diff = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
  return (diff / sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)) ** 0.5


def main(argv):
  del argv
  steps = _STEPS.value
  results = {}
  for split in SPLITS:
    workdir = os.path.join(_WORKDIR.value, "split_{}_{}_{}".format(*split))
    if not os.path.exists(os.path.join(workdir, "checkpoints", str(steps))):
      print(f"training split {split} ...", file=sys.stderr)
      run_split(split, workdir, steps, _LEARNING_RATE.value)
    results[split] = (metrics.read_jsonl(workdir), metrics.read_jsonl(workdir, "eval")[steps]["loss"],
                      final_params(workdir, steps))
  reference_losses, _, reference_params = results[SPLITS[0]]
  print(f"| micro batch x accumulation x devices | loss step 1 | loss step 10 | loss step {steps} "
        "| max loss rel. diff (all steps) | param rel. L2 diff | val loss | tokens/s |")
  print("|---|---|---|---|---|---|---|---|")
  for split, (losses, eval_loss, params) in results.items():
    worst = max(abs(losses[s]["loss"] - reference_losses[s]["loss"]) / reference_losses[s]["loss"]
                for s in range(1, steps + 1))
    speed = sorted(losses[s]["tokens_per_sec"] for s in range(2, steps + 1))[(steps - 1) // 2]
    print(f"| {split[0]} x {split[1]} x {split[2]} | {losses[1]['loss']!r} | {losses[10]['loss']:.9f} | "
          f"{losses[steps]['loss']:.9f} | {worst:.2e} | {relative_l2(params, reference_params):.2e} | "
          f"{eval_loss:.9f} | {speed:,.0f} |")


if __name__ == "__main__":
  app.run(main)
