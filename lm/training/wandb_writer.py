"""Weights & Biases as an optional CLU metric writer, beside the TensorBoard writer (config `train.wandb_project`).

One wandb run per training run, shared by a train and an eval writer that prefix their keys (`train/loss`,
`eval/loss`) so that both sets of curves sit in the same run:

  train_writer, eval_writer = wandb_writer.create(project, workdir, run_config)

- The run lives under `<workdir>/wandb/` (local workdirs; otherwise wandb's default, `$WANDB_DIR` or ./wandb).
- Its id is a hash of the absolute workdir path, and it is opened with `resume="allow"`: a training resumed
  in the same workdir continues the same wandb run. The display name is the workdir's basename.
- The mode is the environment's: online after `wandb login` (or with `WANDB_API_KEY`); `WANDB_MODE=offline`
  needs no network and no account, and `wandb sync <workdir>/wandb/offline-run-*` uploads the run later.

Caveats of wandb itself: online, a resumed run ignores steps below the last one it logged (the steps a
crashed run had logged after its last checkpoint are not written again), and a new training in a reused
workdir path continues the old run (use a new workdir). Offline, `run.finish()` can return before wandb's
service process has written everything; it is complete at process exit (wandb's atexit hook) or after
`wandb.teardown()`.

`wandb` is imported only by `create`, so a run without `train.wandb_project` never loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from clu.metric_writers import interface

from lm import storage


def run_id(workdir: str) -> str:
  """The wandb run id of a workdir: stable across restarts, so a resumed training continues its run."""
  path = storage.absolute(workdir)
  return hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]


class _SharedRun:
  """A wandb run and the writers that log to it; finished when the last of them is closed."""

  def __init__(self, run, writers: int):
    self.run, self._open = run, writers

  def release(self) -> None:
    self._open -= 1
    if self._open == 0:
      self.run.finish()


class WandbWriter(interface.MetricWriter):
  """Logs scalars to a wandb run as `<prefix>/<name>` at the given step; hparams go to the run's config.

  Texts are logged as strings; images, videos, audios, histograms and raw summaries are not written (the
  TensorBoard writer keeps them). `flush` is a no-op: `run.log` already hands the values to wandb's service
  process.
  """

  def __init__(self, shared: _SharedRun, prefix: str):
    self._shared, self._prefix, self._closed = shared, prefix, False

  @property
  def run(self):
    return self._shared.run

  def _log(self, step: int, values: Mapping[str, Any]) -> None:
    self.run.log({f"{self._prefix}/{name}": value for name, value in values.items()}, step=int(step))

  def write_scalars(self, step: int, scalars: Mapping[str, interface.Scalar]):
    # .item(): numpy and jax scalars become Python numbers, which wandb stores exactly.
    self._log(step, {name: np.asarray(value).item() for name, value in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._log(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self.run.config.update(dict(hparams), allow_val_change=True)

  def write_summaries(self, step: int, values: Mapping[str, interface.Array],
                      metadata: Mapping[str, Any] | None = None):
    pass

  def write_images(self, step: int, images: Mapping[str, interface.Array]):
    pass

  def write_videos(self, step: int, videos: Mapping[str, interface.Array]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, interface.Array], *, sample_rate: int):
    pass

  def write_histograms(self, step: int, arrays: Mapping[str, interface.Array],
                       num_buckets: Mapping[str, int] | None = None):
    pass

  def flush(self):
    pass

  def close(self):
    if not self._closed:
      self._closed = True
      self._shared.release()


def create(project: str, workdir: str, run_config: Mapping[str, Any],
           prefixes: Sequence[str] = ("train", "eval")) -> tuple[WandbWriter, ...]:
  """One writer per prefix, all logging to one wandb run of `project` for `workdir`.

  `run_config` (the resolved config, nested dicts allowed) becomes the run's config. Call it on one
  process only (process 0). Each writer must be closed; the run finishes with the last close.
  """
  import wandb  # only here: a run without wandb never imports it

  local = not storage.is_remote(workdir)
  if local:
    os.makedirs(workdir, exist_ok=True)
  run = wandb.init(
      project=project,
      name=os.path.basename(os.path.normpath(workdir)),
      id=run_id(workdir),
      resume="allow",
      dir=os.path.abspath(workdir) if local else None,
      config=dict(run_config),
      allow_val_change=True,  # a resumed run may change keys (num_train_steps raised, ...)
      reinit="create_new",  # never hand back another training's run still open in this process
  )
  shared = _SharedRun(run, len(prefixes))
  return tuple(WandbWriter(shared, prefix) for prefix in prefixes)
