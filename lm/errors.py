"""Errors that end a run with a message for the user rather than a traceback (no jax import here): the one
place each is defined and imported from."""


class ConfigError(ValueError):
  """A configuration that cannot work; the message names the key and a fix."""


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite loss, failed checkpoint save); the message says what to do."""


class Interrupted(Exception):
  """Ctrl-C in the training loop: the step was finished and saved; main.py exits with 130 (128 + SIGINT)."""
