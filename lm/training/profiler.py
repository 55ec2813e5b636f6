"""The `jax.profiler` trace of a range of optimizer steps (config.train.profile_steps) into
`<workdir>/profile`.

Every process traces its own host and writes its own files, `plugins/profile/<session>/<host>.xplane.pb`
and `<host>.trace.json.gz` (as MaxText does): TensorBoard's profile plugin (XProf) reads the directory,
Perfetto (ui.perfetto.dev) opens a `.trace.json.gz`. A profile is a side duty: it never stops the run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax

from lm import console


def steps_to_trace(steps: range | None, resumed_step: int, num_train_steps: int) -> range:
  """The steps of `steps` (numbered from 1) that a run from `resumed_step` to `num_train_steps` takes;
  a warning says which of them it does not take."""
  if steps is None:
    return range(0)
  taken = range(max(steps.start, resumed_step + 1), min(steps.stop, num_train_steps + 1))
  if len(taken) < len(steps):
    traced = f"tracing steps {taken.start} to {taken.stop - 1}" if taken else "nothing is traced"
    console.logger.warning(
        "config.train.profile_steps names steps %d to %d, but this run takes steps %d to %d (%s): %s.",
        steps.start, steps.stop - 1, resumed_step + 1, num_train_steps,
        f"resumed from step {resumed_step}" if resumed_step else "a fresh start", traced)
  return taken


class StepProfile:
  """Traces the optimizer steps of `steps` (numbered from 1, as in the log): the trace starts before the
  first reads its batch and stops once the last has finished on the device. A context manager: leaving it
  stops a trace still running (an error, a NaN stop, a preemption)."""

  def __init__(self, steps: range, workdir: str, pause: Callable[[float], None] = lambda seconds: None):
    """`pause` is told the seconds spent starting and writing the trace, to keep them out of step times."""
    self.directory = os.path.join(workdir, "profile")
    self._steps, self._pause, self._tracing = steps, pause, False

  def __enter__(self) -> StepProfile:
    return self

  def __exit__(self, *exc) -> None:
    if self._tracing:
      self._stop()

  def before(self, step: int) -> None:
    """Called as optimizer step `step` begins, before its batch is read."""
    if not self._steps or step != self._steps.start:
      return
    began = time.perf_counter()
    try:
      jax.profiler.start_trace(self.directory)
    except Exception as e:  # another trace running (only one at a time), an unwritable directory, ...
      console.logger.warning("config.train.profile_steps: the profile could not start (%s); training goes on "
                             "without it.", e)
      return
    self._tracing = True
    console.logger.info("Profiling steps %d to %d (jax.profiler, every process)", self._steps.start,
                        self._steps.stop - 1)
    self._pause(time.perf_counter() - began)

  def after(self, step: int, result: Any) -> None:
    """Called once optimizer step `step` is dispatched, with what it returned."""
    if self._tracing and step == self._steps.stop - 1:
      jax.block_until_ready(result)  # the trace holds the step's device work, not only its dispatch
      self._stop()

  def _stop(self) -> None:
    began = time.perf_counter()
    self._tracing = False
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # on an error path too: never hide the error that ended the loop
      console.logger.warning("config.train.profile_steps: the profile could not be written to %s (%s).",
                             self.directory, e)
      return
    console.logger.info("Profile written to %s (tensorboard --logdir=%s, Profile tab; or a .trace.json.gz "
                        "in ui.perfetto.dev)", self.directory, os.path.dirname(self.directory))
    self._pause(time.perf_counter() - began)
