"""Model FLOPs per token, XLA's FLOP count of a compiled step, peak FLOP/s per device, MFU and HFU; the
figures of a step (loss sums, EMA, step time) and the writers that record them (TensorBoard, optionally
Weights & Biases, metrics.jsonl, the console).

MFU is global: model FLOPs of the whole optimizer step (every micro-batch on every device) divided by
(wall time of the step x number of devices x peak FLOP/s per device). Remat recomputation is not model
FLOPs and is not counted. HFU (hardware FLOPs utilisation) divides instead the FLOPs XLA compiled the step
into: remat recomputation, the masked half of causal attention, elementwise ops and the optimizer update.
`step_flops` counts the compiled optimizer step (all its micro-batches and the one update) as XLA counts
it, the scan over micro-batches extrapolated from compiles at accumulation 1 and 2 as the scan over layers
is from 1 and 2 layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm import console, lora
from lm.config import Config, ConfigError, ModelConfig
from lm.model import layer_pattern

# Dense bf16 peak FLOP/s per chip (per GPU), from the vendors' spec sheets. Matched by substring of
# `device.device_kind`, first match wins, so the more specific names come first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe is 756e12, set train.peak_flops_per_device for it
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  """Forward matmul FLOPs per token, by term; training counts 3x (forward + backward)."""
  attention_projections: int
  attention_scores: int  # QK^T and the weighted sum of V, causal: half of the full square
  mlp: int
  output: int  # the vocabulary projection; the embedding lookup costs no FLOPs
  adapters: int = 0  # LoRA's x A and (x A) B
  frozen: bool = False  # LoRA: the weights get no gradient, only the adapters do
  # LoRA: the first layer's query/key/value projections, whose input (the frozen embeddings) needs no gradient
  first_projections: int = 0

  @property
  def forward(self) -> int:
    return self.attention_projections + self.attention_scores + self.mlp + self.output + self.adapters

  @property
  def train(self) -> int:
    """Forward + backward: a trained weight's matmul costs 3x its forward (the input's gradient and the
    weight's); a frozen one's 2x (the input's gradient alone), 1x where nothing before it is trained (the
    first layer's query, key and value under LoRA); attention scores 3x (two input gradients)."""
    if not self.frozen:
      return 3 * self.forward
    weights = self.attention_projections + self.mlp + self.output
    return 2 * weights - self.first_projections + 3 * (self.attention_scores + self.adapters)


def attended_keys(seq_len: int, window: int = 0) -> float:
  """Keys a query attends to, averaged over the positions of a causal sequence, in the convention that
  a full causal layer averages seq_len / 2. A window W < seq_len: W - W^2 / (2 seq_len) (the first W
  positions see fewer than W keys); W = seq_len gives seq_len / 2 again."""
  if window == 0 or window >= seq_len:
    return seq_len / 2
  return window - window * window / (2 * seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsPerToken:
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  local = sum(layer_pattern(cfg))
  keys = (cfg.num_layers - local) * attended_keys(seq_len) + local * attended_keys(seq_len, cfg.sliding_window)
  return FlopsPerToken(
      attention_projections=cfg.num_layers * 2 * (D * N * H + 2 * D * K * H + N * H * D),
      # Per token: 2 matmuls (scores, values) x 2 FLOPs x N x H x the keys it attends to, summed over the
      # layers (sliding-window layers count their window only).
      attention_scores=round(4 * N * H * keys),
      mlp=cfg.num_layers * 2 * 3 * D * F,  # gated: gate, up and down matrices
      output=2 * D * cfg.vocab_size,
      adapters=cfg.num_layers * 2 * cfg.lora_rank * sum(_lora_widths(cfg)),
      frozen=cfg.lora_rank > 0,
      first_projections=2 * D * (N + 2 * K) * H if cfg.lora_rank else 0,
  )


def _lora_widths(cfg: ModelConfig) -> list[int]:
  """Input + output width of each adapted projection: an adapter costs 2 x rank x that per token."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  widths = {"q_proj": D + N * H, "k_proj": D + K * H, "v_proj": D + K * H, "o_proj": N * H + D,
            "gate_proj": D + F, "up_proj": D + F, "down_proj": F + D}
  return [widths[name] for name in lora.targets(cfg)]


def xla_cost(compiled) -> dict[str, float]:
  """{"flops", "bytes accessed"} of one call of a compiled function on one device, as XLA's cost
  analysis counts them.

  Every op the device runs is counted (matmuls, elementwise ops, remat recomputation), but the body of a
  while loop only once: a scan over layers counts one layer (see `hardware_flops_per_device`). Under SPMD
  the compiled program is one device's share.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jaxlibs: one dict per program
  return {key: float(cost.get(key, 0.0)) for key in ("flops", "bytes accessed")}


def xla_flops(compiled) -> float:
  return xla_cost(compiled)["flops"]


def hardware_cost_per_device(config: Config, compile_variant: Callable[[Config], Any]) -> dict[str, float]:
  """XLA FLOPs and bytes accessed (`xla_cost`) of one optimizer step on one device, every layer and
  every micro-batch counted.

  XLA counts the body of a while loop once, and the step has two: the scan over micro-batches and, with
  scan_layers, the scan over layers. Both are extrapolated, exactly for FLOPs (every layer, and every
  micro-batch but the last, compiles to the same ops; tests/test_flops.py): from 1 and 2 unrolled layers,
  and from accumulation 1 and 2 (the same micro-batch size).

  Args:
    compile_variant: config -> its train step compiled on the same mesh.
  """
  m, k = config.model, config.train.gradient_accumulation_steps

  def count(num_layers: int, accumulation: int) -> np.ndarray:
    # Without local accumulation, which scans all k micro-batches (at 2 too): its FLOPs are the same. (At
    # accumulation 1 the setting is kept: it changes nothing there, and the caller's compile is reused.)
    variant = dataclasses.replace(
        config, model=dataclasses.replace(m, num_layers=num_layers, scan_layers=False),
        train=dataclasses.replace(config.train, gradient_accumulation_steps=accumulation,
                                  local_accumulation=config.train.local_accumulation and accumulation == 1))
    return np.array(list(xla_cost(compile_variant(variant)).values()))

  def layers_counted(accumulation: int) -> np.ndarray:
    if not m.scan_layers:
      return count(m.num_layers, accumulation)
    one, two = count(1, accumulation), count(2, accumulation)
    return one + (m.num_layers - 1) * (two - one)

  single = layers_counted(1)
  total = single if k == 1 else single + (k - 1) * (layers_counted(2) - single)
  return dict(zip(("flops", "bytes accessed"), (float(x) for x in total)))


def hardware_flops_per_device(config: Config, compile_variant: Callable[[Config], Any]) -> float:
  return hardware_cost_per_device(config, compile_variant)["flops"]


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one optimizer step, all micro-steps on all devices."""
  model: float  # analytic (`flops_per_token`): what MFU divides
  hardware: float  # counted by XLA in the compiled step: what HFU divides
  bytes_accessed: float = 0.0  # memory traffic XLA counts in the compiled step (all devices)
  attention: float = 0.0  # the model FLOPs of attention scores (part of `model`)

  def utilisation(self, step_seconds: float, num_devices: int, peak_per_device: float) -> tuple[float, float]:
    """(MFU, HFU) of a step that took `step_seconds`."""
    return (mfu(self.model, step_seconds, num_devices, peak_per_device),
            mfu(self.hardware, step_seconds, num_devices, peak_per_device))


def step_flops(config: Config, num_devices: int, data_parallel: int,
               compile_variant: Callable[[Config], Any]) -> StepFlops:
  """Model and hardware FLOPs (and bytes accessed) of one optimizer step.

  Args:
    data_parallel: devices the batch is split over (mesh data x fsdp).
    compile_variant: see `hardware_cost_per_device`.
  """
  t = config.train
  tokens = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel * t.seq_len
  model = flops_per_token(config.model, t.seq_len).train * tokens
  cost = hardware_cost_per_device(config, compile_variant)
  attention = 3 * flops_per_token(config.model, t.seq_len).attention_scores * tokens
  return StepFlops(model=float(model), hardware=cost["flops"] * num_devices,
                   bytes_accessed=cost["bytes accessed"] * num_devices, attention=float(attention))


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on the default device: the practical peak of a CPU."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def spec_peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device kind from `PEAK_FLOPS`, or None for an unknown kind."""
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def peak_flops_per_device(device, override: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the figure comes from."""
  if override > 0:
    return override, "config.train.peak_flops_per_device"
  flops = spec_peak_flops(device.device_kind)
  if flops is not None:
    return flops, f"spec sheet for {device.device_kind}"
  if device.platform == "cpu":
    # Simulated CPU devices (--xla_force_host_platform_device_count) share the same cores.
    shared_by = len(jax.local_devices())
    return (measure_matmul_peak() / shared_by,
            f"measured: float32 matmul probe on this CPU, shared by {shared_by} device(s)")
  raise ConfigError(
      f"No peak FLOP/s known for device kind {device.device_kind!r}; set "
      "config.train.peak_flops_per_device (FLOP/s of one device, e.g. 989e12 for an H100 SXM).")


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float) -> float:
  return flops_per_step / (step_seconds * num_devices * peak_per_device)


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
    self._path = None if "://" in workdir or not enabled else os.path.join(workdir, "metrics.jsonl")

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
    from lm import wandb_writer
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
                     mfu=mfu(tp.flops_per_step, seconds, tp.num_devices, tp.peak_flops_per_device))
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
