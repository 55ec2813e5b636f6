"""Model FLOPs per token, peak FLOP/s per device, MFU, and the loss EMA.

MFU is global: model FLOPs of the whole optimizer step (every micro-batch on every device) divided by
(wall time of the step x number of devices x peak FLOP/s per device). Remat recomputation is not model
FLOPs and is not counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

from lm.config import ConfigError, ModelConfig

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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsPerToken:
  D, N, K, H, F, layers = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                           cfg.num_layers)
  return FlopsPerToken(
      attention_projections=layers * 2 * (D * N * H + 2 * D * K * H + N * H * D),
      # Per token: 2 matmuls (scores, values) x 2 FLOPs x N x H x (average causal context seq_len / 2).
      attention_scores=layers * 2 * N * H * seq_len,
      mlp=layers * 2 * 3 * D * F,
      output=2 * D * cfg.vocab_size,
  )


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


def peak_flops_per_device(device, override: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the figure comes from."""
  if override > 0:
    return override, "config.train.peak_flops_per_device"
  for name, flops in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
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
