"""Trains a decoder-only language model: `python main.py --config=configs/default.py --workdir=runs/default`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm.config import ConfigError, from_config_dict

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from lm import train  # after flag parsing: importing jax early would ignore XLA flags set above

  try:
    config = from_config_dict(_CONFIG.value)
    train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    logging.error("Configuration error: %s", e)
    print(f"Configuration error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
