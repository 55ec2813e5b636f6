"""Errors that end a run with a message for the user rather than a traceback (no jax import here)."""

from lm.config import ConfigError  # noqa: F401  (re-exported: the two errors main.py reports)


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, failed checkpoint save); the message says what to do."""
