"""One command on a machine with a GPU: is the GPU path right, how fast is it, and was its memory planned?

  python scripts/gpu_check.py [--steps=5] [--attention_only]

In under 5 minutes on one H100, with the project's environment and jax[cuda12] (no TensorFlow):
1. Attention: lm.model.attention's cuDNN path (cuDNN's flash attention) and its XLA path, both in bfloat16,
   against the XLA path in float32: the output and the gradients of q, k and v, on packed rows (documents
   of random length: the documents' mask) and on a sliding-window layer (Gemma's local layers). cuDNN
   passes when its largest error, relative to the reference's largest value, is within a bfloat16
   tolerance and at most twice the XLA path's.
2. Steps on one GPU, synthetic packed batches, bfloat16 compute: bench_60m and llama_1_36b's dimensions at
   2 layers. The median step time, tokens/s, the MFU of the model's FLOPs (lm.training.flop_count) at
   the device's bfloat16 peak, and the peak memory the device reports against the planner's figure
   for the same compiled step (XLA's memory analysis, as scripts/plan.py --topology=h100:1 prints it).
Exit status 1 when a check fails, 2 when jax sees no GPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lm.config import Config, from_config_dict  # noqa: E402
from lm.data import batching, synthetic  # noqa: E402
from lm.model import attention, sharding  # noqa: E402
from lm.tools import hlo  # noqa: E402
from lm.training import flop_count, runtime  # noqa: E402
from lm.training.optimizer import make_optimizer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed optimizer steps per model, after one untimed.", lower_bound=1)
_ATTENTION_ONLY = flags.DEFINE_bool("attention_only", False, "Check the attention alone (no steps).")
TOLERANCE = 2e-2  # bfloat16 has 8 bits of mantissa: 2^-8 = 0.4 % per rounding, a few roundings deep
GB = 1e9


def attention_errors(implementation: str, window: int = 0, batch: int = 2, length: int = 1024, heads: int = 8,
                     kv_heads: int = 2, head_dim: int = 128, seed: int = 0) -> dict[str, float]:
  """{out, dq, dk, dv: the largest error of `implementation` in bfloat16 against the XLA path in float32,
  relative to the reference's largest value}, on packed rows (documents of random length) with a sliding
  window of `window` (0: causal only)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.float32) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  starts = np.random.default_rng(seed).random((batch, length)) < 4 / length  # about 4 documents a row
  starts[:, 0] = True
  segment_ids = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)

  def run(name: str, dtype):
    ctx = attention.context(name, segment_ids, window)
    attend = lambda q, k, v: attention.attend(ctx, q, k, v, local=bool(window), scale=head_dim ** -0.5)
    out, pull = jax.vjp(jax.jit(attend), *(x.astype(dtype) for x in (q, k, v)))
    return [x.astype(jnp.float32) for x in (out, *pull(cotangent.astype(dtype)))]

  reference, tested = run("xla", jnp.float32), run(implementation, jnp.bfloat16)
  return {name: float(jnp.max(jnp.abs(t - r)) / jnp.max(jnp.abs(r)))
          for name, t, r in zip(("out", "dq", "dk", "dv"), tested, reference)}


def check_attention() -> tuple[list[str], bool]:
  """The printed comparison of cuDNN and XLA attention, and whether cuDNN passed."""
  lines, passed = [], True
  for label, window in (("packed documents, causal", 0), ("packed documents, sliding window 256", 256)):
    cudnn, xla = attention_errors("cudnn", window), attention_errors("xla", window)
    for name in cudnn:
      ok = cudnn[name] <= max(TOLERANCE, 2 * xla[name])
      passed &= ok
      lines.append(f"  {label:38s} {name:3s}: cudnn {cudnn[name]:.2e}  xla bf16 {xla[name]:.2e}  "
                   f"{'ok' if ok else 'FAILED'}")
  return lines, passed


def step_config(name: str) -> Config:
  """bench_60m (seq_len 256), or llama_1_36b at 2 layers (seq_len 2048), in bfloat16 on one device, 16,384
  tokens per micro-batch and 2 micro-batches per step."""
  from configs import bench_60m, llama_1_36b  # noqa: PLC0415
  c = (bench_60m if name == "bench_60m" else llama_1_36b).get_config()
  if name != "bench_60m":
    c.model.num_layers = 2
  c.model.dtype = "bfloat16"
  c.train.micro_batch_size, c.train.gradient_accumulation_steps = (64, 2) if name == "bench_60m" else (8, 2)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.mesh.dcn_data, c.mesh.dcn_fsdp = 1, 1
  return from_config_dict(c)


def measure_step(config: Config, steps: int, device) -> dict[str, float]:
  """The compiled train step on `device`: step times, MFU, the device's peak memory, the planner's figure."""
  rt = runtime.setup(config, [device])
  t = config.train
  sequences = synthetic.sequences(config, rt.plan.global_sequences)
  global_batch = batching.TrainBatches({"synthetic": sequences}, t.seed, rt.plan.global_sequences).get(0)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(t, steps + 1))
    compiled = fns.step_fn.lower(fns.abstract_state, rt.abstract_step_batch()).compile()
    state = fns.create_state()
    batch = sharding.put_step_batch(batching.micro_batches(global_batch, rt.plan), rt.mesh)
    seconds = []
    for _ in range(steps + 1):  # the first one untimed: its transfers and allocations
      start = time.perf_counter()
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      seconds.append(time.perf_counter() - start)
  tokens = rt.plan.global_sequences * t.seq_len
  median = statistics.median(seconds[1:])
  model_flops = flop_count.flops_per_token(config.model, t.seq_len).train * tokens
  peak = flop_count.spec_peak_flops(device.device_kind)
  stats = device.memory_stats() or {}  # the peak since the process began: measure the smaller step first
  return {"step_seconds": median, "tokens_per_second": tokens / median,
          "mfu": model_flops / median / peak if peak else float("nan"),
          "peak_bytes": float(stats.get("peak_bytes_in_use", float("nan"))), "planned_bytes": hlo.live_bytes(compiled)}


def describe_step(name: str, figures: dict[str, float]) -> str:
  return (f"  {name:12s} step {figures['step_seconds'] * 1e3:8.1f} ms  {figures['tokens_per_second']:>10,.0f} "
          f"tokens/s  MFU {figures['mfu']:.3f}  peak memory {figures['peak_bytes'] / GB:.2f} GB, planned "
          f"{figures['planned_bytes'] / GB:.2f} GB")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    print(f"gpu_check.py needs a GPU: jax sees {jax.devices()[0].platform} devices only. On a machine with an "
          "NVIDIA GPU, install jax[cuda12] at the locked jax's version beside the project's environment, and "
          "run it there (scripts/plan.py --topology=h100:8 plans for GPUs from any machine).", file=sys.stderr)
    sys.exit(2)
  device = gpus[0]
  print(f"Device: {device.device_kind}, jax {jax.__version__}")
  lines, passed = check_attention()
  print("Attention: largest error against XLA attention in float32, relative to its largest value:")
  print("\n".join(lines))
  if not _ATTENTION_ONLY.value:
    print(f"Train steps on one GPU (bfloat16 compute; median of {_STEPS.value}):")
    for name in ("bench_60m", "llama_1_36b (2 layers)"):
      figures = measure_step(step_config(name.split()[0]), _STEPS.value, device)
      print(describe_step(name, figures), flush=True)
  print("All checks passed." if passed else "cuDNN attention FAILED against XLA attention (above).")
  sys.exit(0 if passed else 1)


if __name__ == "__main__":
  app.run(main)
