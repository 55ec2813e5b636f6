"""What the run prints: an aligned startup block, one line per log interval, eval lines that stand out.

The lines go through the `lm` logger (stderr, process 0 only), apart from absl, so that `main.py` can keep
the libraries' INFO chatter (orbax's per-save progress, TFDS) off the console by default.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lm")


def start_command(argv: list[str]) -> None:
  """The start of a command (main.py, scripts/sample.py), after absl has parsed the flags: no stray
  arguments; the libraries' INFO logs (orbax reports every save in ~20 lines) only with --verbosity=0;
  the command's own lines through the `lm` logger."""
  from absl import app, flags, logging as absl_logging  # here: the rest of the library does not need absl
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  setup(is_main=True)


def setup(is_main: bool = True) -> None:
  """Sends the `lm` logger to stderr on process 0; other processes stay quiet."""
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO if is_main else logging.WARNING)
  logger.propagate = False


def block(lines: list[tuple[str, str]]) -> None:
  """`label: value` lines with the values aligned. Keep labels to 20 characters, the width of
  "Gradient accum steps", whose line users grep for exactly."""
  width = max(len(label) for label, _ in lines) + 2
  for label, value in lines:
    logger.info("%s", f"{label + ':':<{width}}{value}")


def duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def step_line(step: int, total: int, scalars: dict[str, float], eta_seconds: float | None) -> str:
  width = len(str(total))
  parts = [f"step {step:>{width}}/{total}", f"loss {scalars['loss']:.4f}", f"ema {scalars['loss_ema']:.4f}",
           f"lr {scalars['learning_rate']:.2e}", f"grad {scalars['grad_norm']:.3f}"]
  if "reward_mean" in scalars:  # GRPO: what it is trained for
    parts += [f"reward {scalars['reward_mean']:.3f}", *([f"kl {scalars['kl']:.4f}"] if "kl" in scalars else []),
              f"length {scalars['completion_length']:.1f}",
              *([f"ended {scalars['finished']:.2f}"] if "finished" in scalars else [])]
  if "tokens_per_sec" in scalars:
    parts += [f"{scalars['tokens_per_sec']:,.0f} tok/s", f"MFU {100 * scalars['mfu']:.1f}%"]
  if eta_seconds is not None:
    parts.append(f"ETA {duration(eta_seconds)}")
  return " | ".join(parts)


def eval_line(step: int, loss: float, perplexity: float, tokens: int) -> str:
  return f">>> eval  step {step}: loss {loss:.4f} | perplexity {perplexity:.2f} | {tokens:,} tokens <<<"
