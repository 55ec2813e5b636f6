"""The figures of a step and the writers that record them: per-sequence loss sums added in row order, the
loss EMA, the step time (pausable: eval and checkpoint copies are not training), tokens/s and MFU
(`lm.training.flop_count`), and the writers (TensorBoard, optionally Weights & Biases, metrics.jsonl, the
console)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from lm import console, storage
from lm.training import flop_count


class Ema:
  """Bias-corrected exponential moving average, so the first values are not pulled towards 0."""

  def __init__(self, decay: float = 0.9, state: dict | None = None):
    self.decay, self.value, self._weight = decay, 0.0, 0.0
    if state:  # a resumed run continues the average it had (checkpointed with the state)
      self.value, self._weight = float(state["value"]), float(state["weight"])

  def state(self) -> dict:
    return {"value": self.value, "weight": self._weight}

  def update(self, x: float) -> float:
    self.value = self.decay * self.value + (1 - self.decay) * x
    self._weight = self.decay * self._weight + (1 - self.decay)
    return self.value / self._weight


class JsonlLog:
  """`<workdir>/metrics.jsonl`: one JSON object per logged step, floats at full (float64) precision, so
  that runs can be compared exactly. TensorBoard events hold float32. Object stores cannot append, so
  for a gs:// workdir only the TensorBoard events are written."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._path = None if storage.is_remote(workdir) or not enabled else os.path.join(workdir, "metrics.jsonl")

  def write(self, collection: str, step: int, scalars: dict[str, float]) -> None:
    if self._path is not None:
      with open(self._path, "a") as f:
        f.write(json.dumps({"collection": collection, "step": step, **scalars}) + "\n")


def read_jsonl(workdir: str, collection: str = "train") -> dict[int, dict[str, float]]:
  """{step: scalars} of one collection; a step logged twice (a resumed run) keeps its last record."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.pop("collection") == collection:
        out[row.pop("step")] = row
  return out


def sum_losses(fetched: dict) -> tuple[float, int]:
  """Loss sum and token count of per-sequence figures (host arrays in global row order), added in that
  order in float64: the same figure however the batch was split."""
  losses = np.asarray(fetched["sequence_loss"]).reshape(-1)
  return math.fsum(losses.astype(np.float64)), int(np.asarray(fetched["sequence_tokens"]).sum())


class StepTimer:
  """Average wall time per optimizer step between log points, leaving out compilation (the first step
  of the run) and the pauses for eval and checkpoints."""

  def __init__(self):
    self._start, self._step = None, 0

  def step_seconds(self, step: int) -> float | None:
    """Called when `step` has finished; returns the average since the last call, or None."""
    now = time.perf_counter()
    seconds = None if self._start is None else (now - self._start) / max(step - self._step, 1)
    self._start, self._step = now, step
    return seconds

  def pause(self, seconds: float) -> None:
    if self._start is not None:
      self._start += seconds


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What turns a step time into tokens/s and MFU."""
  tokens_per_step: int
  flops_per_step: float  # model FLOPs of one optimizer step, all micro-batches and devices
  num_devices: int
  peak_flops_per_device: float


def _writers(workdir: str, wandb_project: str, run_config: dict, tensorboard: bool) -> list[tuple]:
  """(train, eval) pairs of CLU writers: TensorBoard under <workdir>/train and /eval, and the Weights &
  Biases run when a project is named."""
  writers = []
  if tensorboard:
    from clu import metric_writers  # here: TensorFlow (its TensorBoard writer) stays out of the core
    writers.append(tuple(metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.path.join(workdir, name)))
                         for name in ("train", "eval")))
  if wandb_project:
    from lm.training import wandb_writer
    writers.append(wandb_writer.create(wandb_project, workdir, run_config))
  return writers


class MetricsLogger:
  """Records train and eval figures: the writers, metrics.jsonl and the console line (process 0 only).
  It writes; deciding to stop the run is the loop's."""

  def __init__(self, workdir: str, *, num_train_steps: int, log_interval_steps: int, throughput: Throughput,
               start_step: int, wandb_project: str = "", run_config: dict | None = None, tensorboard: bool = True,
               progress: dict | None = None):
    is_main = jax.process_index() == 0
    self._num_train_steps, self._log_interval, self._throughput = num_train_steps, log_interval_steps, throughput
    self._start_step = start_step
    self._writers = _writers(workdir, wandb_project, run_config or {}, tensorboard) if is_main else []
    self._progress = None  # clu's steps_per_sec and uptime, beside the TensorBoard writer
    if self._writers and tensorboard:
      from clu import periodic_actions
      self._progress = periodic_actions.ReportProgress(num_train_steps=num_train_steps, every_steps=log_interval_steps,
                                                       writer=self._writers[0][0])
    self._jsonl = JsonlLog(workdir, enabled=is_main)
    self._ema, self.timer = Ema(state=(progress or {}).get("loss_ema")), StepTimer()
    self.last: dict[str, float] = {}

  def progress(self) -> dict:
    """What a checkpoint keeps of the logger, for a resumed run to log as an uninterrupted one would."""
    return {"loss_ema": self._ema.state()}

  def train_step(self, step: int, scalars: dict[str, float]) -> None:
    """A finished optimizer step's figures (loss, grad_norm, skipped_updates, learning_rate): the loss
    EMA every step, the rest written every log interval and at the last step."""
    scalars = dict(scalars)
    scalars["loss_ema"] = self._ema.update(scalars["loss"]) if math.isfinite(scalars["loss"]) else math.nan
    if self._progress is not None:
      self._progress(step, time.time())
    first = step == self._start_step + 1  # carries compilation: timing starts at its end
    if first:
      self.timer.step_seconds(step)
    if step % self._log_interval and step != self._num_train_steps:
      return
    tp = self._throughput
    scalars["tokens_seen"] = step * tp.tokens_per_step
    if not first:
      seconds = self.timer.step_seconds(step)
      tokens_per_sec = tp.tokens_per_step / seconds
      scalars.update(step_time=seconds, tokens_per_sec=tokens_per_sec,
                     tokens_per_sec_per_device=tokens_per_sec / tp.num_devices,
                     mfu=flop_count.mfu(tp.flops_per_step, seconds, tp.num_devices, tp.peak_flops_per_device))
    for writer, _ in self._writers:
      writer.write_scalars(step, scalars)
    self._jsonl.write("train", step, scalars)
    self.last.update(scalars)
    seconds = self.last.get("step_time")
    eta = None if seconds is None else seconds * (self._num_train_steps - step)
    console.logger.info("%s", console.step_line(step, self._num_train_steps, scalars, eta))

  def eval(self, step: int, result: dict[str, float]) -> None:
    """A kind's eval figures: the language model's loss, perplexity and tokens, or others (GRPO's rewards)."""
    for _, writer in self._writers:
      writer.write_scalars(step, result)
    self._jsonl.write("eval", step, result)
    self.last.update({f"eval_{k}": v for k, v in result.items()})
    if {"loss", "perplexity", "tokens"} <= set(result):
      console.logger.info("%s", console.eval_line(step, result["loss"], result["perplexity"], result["tokens"]))
    else:
      console.logger.info(">>> eval  step %d: %s <<<", step, " | ".join(f"{k} {v:.4f}" for k, v in result.items()))

  def close(self) -> None:
    for writer in (w for pair in self._writers for w in pair):
      writer.flush()
      writer.close()
