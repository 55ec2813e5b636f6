"""The preemption notice: SIGTERM (a preemption) or a first Ctrl-C asks the loop for a last save."""

from __future__ import annotations

import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp


class PreemptionNotice:
  """Set by SIGTERM (how Cloud TPU, GKE and SLURM announce a preemption) and by a first Ctrl-C (SIGINT):
  the loop finishes its step, saves it and stops. A second Ctrl-C ends the process at once (the signal's
  default action; the newest complete checkpoint stays as it was). With several processes JAX's
  preemption sync point handles SIGTERM instead: every process stops at the same step, which a signal seen
  by one host alone could not give. A context manager: the previous handlers come back when the loop
  ends."""

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager, self._signalled, self.interrupted, self._previous = manager, False, False, {}

  def __enter__(self) -> PreemptionNotice:
    if threading.current_thread() is threading.main_thread():
      if jax.process_count() == 1:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def _on_interrupt(self, signum, frame):
    del signum, frame
    self.interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: gone at once
    print("\nCtrl-C: finishing this step and saving it; Ctrl-C again exits at once without saving.",
          file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    return self._manager.reached_preemption(step) or self._signalled or self.interrupted
