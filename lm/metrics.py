"""Model FLOPs per token, XLA's FLOP count of a compiled step, peak FLOP/s per device, MFU and HFU, and
the loss EMA.

MFU is global: model FLOPs of the whole optimizer step (every micro-batch on every device) divided by
(wall time of the step x number of devices x peak FLOP/s per device). Remat recomputation is not model
FLOPs and is not counted. HFU (hardware FLOPs utilisation) divides instead the FLOPs XLA compiled the step
into: remat recomputation, the masked half of causal attention, elementwise ops and the optimizer update.
`step_flops` counts the compiled last micro-step (`update_step`) once per micro-step, so it counts the
optimizer update in each, where the loop runs it only in the last (`accumulate_step` before): an overcount
of (k - 1) optimizer updates, some 10 FLOPs per parameter against the matmuls' 6 per parameter per token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

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

  @property
  def forward(self) -> int:
    return self.attention_projections + self.attention_scores + self.mlp + self.output

  @property
  def train(self) -> int:
    return 3 * self.forward


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
  )


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled function on one device, as XLA's cost analysis counts them.

  Every op the device runs is counted (matmuls, elementwise ops, remat recomputation), but the body of a
  while loop only once: a scan over layers counts one layer (see `hardware_flops_per_device`). Under SPMD
  the compiled program is one device's share.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jaxlibs: one dict per program
  return float(cost["flops"])


def hardware_flops_per_device(compiled, model_cfg: ModelConfig,
                              compile_unrolled: Callable[[int], Any] | None = None) -> float:
  """XLA FLOPs of one call of a compiled train micro-step on one device, every layer counted.

  Args:
    compiled: the step as compiled for the run; its count is used as is when the layers are unrolled.
    compile_unrolled: n -> the same step compiled with `num_layers=n, scan_layers=False`; needed when
      the model scans its layers, since XLA counts a scan's body once. The count is then extrapolated
      from 1 and 2 unrolled layers (exact: every layer compiles to the same ops; tests/test_flops.py).
  """
  if not model_cfg.scan_layers:
    return xla_flops(compiled)
  if compile_unrolled is None:
    raise ValueError("a scanned model needs compile_unrolled: XLA counts the scan body once")
  one, two = (xla_flops(compile_unrolled(n)) for n in (1, 2))
  return one + (model_cfg.num_layers - 1) * (two - one)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one optimizer step, all micro-steps on all devices."""
  model: float  # analytic (`flops_per_token`): what MFU divides
  hardware: float  # counted by XLA in the compiled step: what HFU divides

  def utilisation(self, step_seconds: float, num_devices: int, peak_per_device: float) -> tuple[float, float]:
    """(MFU, HFU) of a step that took `step_seconds`."""
    return (mfu(self.model, step_seconds, num_devices, peak_per_device),
            mfu(self.hardware, step_seconds, num_devices, peak_per_device))


def step_flops(compiled, config: Config, num_devices: int, data_parallel: int,
               compile_unrolled: Callable[[int], Any] | None = None) -> StepFlops:
  """Model and hardware FLOPs of one optimizer step of a compiled train micro-step.

  Args:
    compiled: `step_fn.lower(abstract_state, abstract_micro_batch, loss_scale).compile()`.
    data_parallel: devices the batch is split over (mesh data x fsdp).
    compile_unrolled: see `hardware_flops_per_device`; only for scanned layers.
  """
  t = config.train
  tokens = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel * t.seq_len
  model = flops_per_token(config.model, t.seq_len).train * tokens
  per_micro_step = hardware_flops_per_device(compiled, config.model, compile_unrolled)
  # Counted as if every micro-step ran this program (the optimizer included), on every device its share.
  return StepFlops(model=float(model),
                   hardware=per_micro_step * t.gradient_accumulation_steps * num_devices)


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

  def __init__(self, decay: float = 0.9):
    self.decay, self.value, self._weight = decay, 0.0, 0.0

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
