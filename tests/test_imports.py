"""The core imports no TensorFlow, TFDS or CLU: the step, a synthetic-data benchmark and the data
preparation (TFDS only for a tfds source) run in a plain JAX image (a GPU machine with jax and flax only)."""

import subprocess
import sys

from tests.test_train import ROOT

CORE = ("lm.model.decoder", "lm.training.train_step", "lm.model.sharding", "lm.training.optimizer",
        "lm.checkpoints.checkpoint", "lm.checkpoints.param_files", "lm.checkpoints.resume", "lm.data.batching",
        "lm.training.runtime", "lm.training.metrics", "lm.training.flop_count", "lm.tools.hlo",
        "lm.data.tokenizer", "lm.data.sources", "lm.data.prepare", "lm.data.corpus")
HEAVY = ("tensorflow", "tensorflow_datasets", "clu")


def _loaded_after_import(modules) -> list[str]:
  code = (f"import sys; import {', '.join(modules)}; "
          f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  return result.stdout.split()


def test_core_imports_neither_tensorflow_nor_tfds_nor_clu():
  assert _loaded_after_import(CORE) == []


def test_the_check_can_fail():
  assert "clu" in _loaded_after_import(["lm.training.wandb_writer"])
