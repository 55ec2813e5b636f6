"""Model FLOPs per token, XLA's FLOP count of a compiled step, peak FLOP/s per device, MFU and HFU.

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
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import Config, ModelConfig
from lm.errors import ConfigError
from lm.model import lora
from lm.model.decoder import layer_pattern


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
  the compiled program is one device's share. XLA:GPU compiled without a GPU (lm.tools.topology) gives no
  cost analysis: its optimized module is then analysed by the CPU client's HloCostAnalysis, the same
  counting of the same (GPU-fused) program.
  """
  cost = compiled.cost_analysis()
  if cost is None:
    from jax._src import xla_bridge  # noqa: PLC0415  (jax has no public API for a module's cost)
    from jax._src.lib import _jax  # noqa: PLC0415
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
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
    # Without local accumulation, which scans all k micro-batches (at 2 too), and without the batch-invariant
    # sum, which scans row groups: their model FLOPs are the same. (At
    # accumulation 1 the setting is kept: it changes nothing there, and the caller's compile is reused.)
    variant = dataclasses.replace(
        config, model=dataclasses.replace(m, num_layers=num_layers, scan_layers=False),
        train=dataclasses.replace(config.train, gradient_accumulation_steps=accumulation,
                                  local_accumulation=config.train.local_accumulation and accumulation == 1,
                                  batch_invariant=False))
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
