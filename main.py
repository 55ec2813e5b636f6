"""Trains a decoder-only language model: `python main.py --config=configs/default.py --workdir=runs/default`.

`--mode=eval` evaluates the run's checkpoints instead, in a separate process (any mesh, a CPU too):
`python main.py --config=configs/default.py --workdir=runs/default --mode=eval [--step=N] [--follow]`.
"""

import os
import signal
import sys

# TensorFlow (under TFDS and the TensorBoard writer) prints C++ INFO lines at import unless told not to.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only reads data and writes events here

from absl import app, flags
from ml_collections import config_flags

from lm import config_file, console, distributed
from lm.config import from_config_dict
from lm.errors import ConfigError, Interrupted, TrainingError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (resuming from the latest checkpoint). eval: evaluate checkpoints of "
                          "the run in --workdir on the validation set, without writing to them.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step to evaluate (default: the latest).")
_FOLLOW = flags.DEFINE_bool("follow", False, "--mode=eval: then evaluate each new checkpoint as it appears, "
                            "until config.train.num_train_steps or --follow_timeout.")
_FOLLOW_TIMEOUT = flags.DEFINE_float("follow_timeout", 3600.0,
                                     "--mode=eval --follow: stop after this many seconds without a new checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])
# Several hosts: Cloud TPU, SLURM (srun) and Open MPI (mpirun) are detected; elsewhere give all three.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (one per host); 1 = run alone.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0 to num_processes - 1.")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds for all processes to join, then an error.")


def set_determinism_flags(deterministic: bool, batch_invariant: bool = False) -> str:
  """XLA flags for run-to-run reproducible results, set before jax starts; says what it set.

  TPU and CPU kernels are deterministic as they are; GPU needs deterministic reductions and scatters
  (slower embedding gradients, no atomics). config.train.batch_invariant also needs every bfloat16
  intermediate rounded as the program says: XLA otherwise keeps some in float32 where its fusions allow,
  which differs between programs of other shapes (`lm.training.train_step._ordered_sum`)."""
  if not deterministic:
    return "off (config.train.deterministic = False): GPU reductions may vary between runs"
  flags = ["--xla_gpu_deterministic_ops=true"] + (["--xla_allow_excess_precision=false"] if batch_invariant else [])
  for flag in flags:
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  return (f"XLA_FLAGS {' '.join(flags)} (" + ("GPU; the second everywhere" if batch_invariant else "GPU")
          + "); TPU and CPU are deterministic without flags")


def main(argv):
  # Ctrl-C ends the process at once (no traceback; within compiles too, which a Python handler would only
  # see when they return). Only the training loop catches it, to finish and save its step first.
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  console.start_command(argv)
  try:
    config = from_config_dict(_CONFIG.value)
    if not _WORKDIR.value.strip():
      raise ConfigError("--workdir is empty: it would write checkpoints and metrics into the current "
                        "directory. Name a directory for the run, e.g. --workdir=runs/my_run (or gs://...).")
    determinism = set_determinism_flags(config.train.deterministic, config.train.batch_invariant)
    if _MODE.value != "eval" and (_STEP.value is not None or _FOLLOW.value):
      raise app.UsageError("--step and --follow are for --mode=eval.")
    # Only now: XLA reads its flags when jax initialises. The other processes join before any device is
    # touched, and before the heavy imports of the training stack, so that a bad launch fails fast.
    import jax

    launch = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if launch is not None:
      distributed.initialize(launch, _TIMEOUT.value)
    console.setup(is_main=jax.process_index() == 0)
    from lm.training import evaluate, train

    console.logger.info("Determinism: %s", determinism)
    if launch is not None:
      console.logger.info("Processes: %d, %s", jax.process_count(), launch.describe())
    if _MODE.value == "eval":
      evaluate.run(config, _WORKDIR.value, step=_STEP.value, follow=_FOLLOW.value,
                   follow_timeout=_FOLLOW_TIMEOUT.value)
    else:  # every kind of training: next-token (pre-training, SFT), GRPO
      train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    print(f"Configuration error: {e}", file=sys.stderr)
    distributed.exit_with(2)
  except TrainingError as e:
    print(f"{'Evaluation' if _MODE.value == 'eval' else 'Training'} stopped: {e}", file=sys.stderr)
    distributed.exit_with(1)
  except Interrupted as e:
    print(e, file=sys.stderr)
    distributed.exit_with(130)


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
