"""Errors that end a run with a message for the user rather than a traceback (no jax import here)."""

from lm.config import ConfigError  # noqa: F401  (re-exported: the two errors main.py reports)


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, failed checkpoint save); the message says what to do."""


class Interrupted(Exception):
  """Ctrl-C in the training loop: the step was finished and saved; main.py exits with 130 (128 + SIGINT)."""
