"""Will a config fit, and how fast would it run? Compiles the real train step ahead of time and says.

  python scripts/plan.py --config=configs/llama_1_36b.py --topology=v5p:2x2x1
  python scripts/plan.py --config=configs/gemma3_1b.py --topology=v5e:2x4 --num_slices=2
  python scripts/plan.py --config=configs/llama_1_36b.py --topology=h100:8
  python scripts/plan.py --config=configs/llama_1_36b.py --topology=h100:2x8
  python scripts/plan.py --config=configs/llama_1_36b.py --devices=8 --device_kind=h100
  python scripts/plan.py --config=configs/llama_1_36b.py --devices=8 --memory_table=16,24,40,80,141

The train step of `lm.training.runtime.train_functions` (one optimizer step: every micro-batch and the update) is
compiled for the mesh of a TPU slice or GPU machine with --topology: XLA:TPU's own compile (libtpu) or
XLA:GPU's (jax's CUDA plugin, for XLA's target config of the card), no TPU or GPU needed (see
lm/tools/topology.py), whose memory, FLOPs, bytes accessed and collectives are the devices'; a roofline step
time (FLOPs at the device's peak against bytes at its HBM bandwidth) is printed beside the one at --mfu.
Without --topology it is compiled for --devices simulated CPU devices (a -1 mesh axis resolves against
them), an estimate. Printed per device: parameter, optimizer-state and
accumulator bytes (from the state's shardings), temporary bytes (XLA's memory analysis of the compiled
step: activations, gradients, the logits), their total against the device's memory; then FLOPs per
optimizer step and the step time and tokens/s they imply at --mfu. When the step does not fit, smaller
micro-batches (same global batch: more accumulation), stronger remat and a larger fsdp axis are
compiled until one fits. --memory_table instead lists, per memory size, the largest micro-batch each
remat policy fits. Without --topology, memory comes from XLA's CPU compile of the same program: an
estimate of GPU memory, whose compiler schedules and fuses differently. Any config key can be overridden
(--config.train.micro_batch_size=4).
"""

import os
import re
import sys


def _force_cpu_devices(argv: list[str]) -> None:
  """XLA reads the device count when jax starts, so --devices must reach XLA_FLAGS before any import of
  jax; CPU also on a GPU or TPU machine, whose memory would not be what is planned for."""
  count = "8"
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      count = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      count = argv[i + 1]
  flags_without_count = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_without_count} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


if __name__ == "__main__":
  _force_cpu_devices(sys.argv)

import dataclasses  # noqa: E402  (after the device count is set)
import math  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from lm import config_file  # noqa: E402
from lm.config import Config, from_config_dict  # noqa: E402
from lm.errors import ConfigError  # noqa: E402
from lm.model import sharding  # noqa: E402
from lm.model.decoder import param_count  # noqa: E402
from lm.tools import hlo, topology  # noqa: E402
from lm.training import flop_count, runtime  # noqa: E402
from lm.training.optimizer import make_optimizer  # noqa: E402

GB = 1e9  # decimal, as vendors quote memory; conservative against the GiB devices have

# --device_kind: (a device_kind that lm.training.flop_count.PEAK_FLOPS knows, memory per device in GB)
DEVICE_KINDS = {
    "v4": ("TPU v4", 32), "v5e": ("TPU v5e", 16), "v5p": ("TPU v5p", 95), "v6e": ("TPU v6e", 32),
    "a100_40": ("A100", 40), "a100_80": ("A100", 80), "h100": ("H100", 80), "h200": ("H200", 141),
}
KERNELS = ("splash", "cudnn")  # attention as custom calls: no FLOPs in XLA's cost analysis
REMAT_ORDER = ("none", "save_dots", "full")  # least to most recomputation, most to least memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU slice, as libtpu names it (v5e:2x4, v5p:2x2x1, v6e:4x4), "
                                "or GPUs: h100:8 (one host of 8), h100:2x8 (two hosts), h200:8, a100:8: compile "
                                "with XLA:TPU or XLA:GPU for them. Empty: --devices simulated CPU devices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology, joined over the data-centre network.",
                                   lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices of the planned mesh (simulated on the CPU).", lower_bound=1)
_DEVICE_KIND = flags.DEFINE_enum("device_kind", "h100", sorted(DEVICE_KINDS),
                                 "Accelerator planned for without --topology.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", 0.0, "Memory per device in GB; 0 = the chip's (--topology) or "
                                 "that of --device_kind.", lower_bound=0.0)
_USABLE = flags.DEFINE_float("usable_fraction", 0.9,
                             "Share of the memory a step may use: runtime reserves, fragmentation and the "
                             "estimate's error need the rest. GPUs: JAX preallocates 0.75 by default.")
_HARDWARE_FLOPS = flags.DEFINE_bool("hardware_flops", True, "Also count XLA's FLOPs of the step (HFU): up to "
                                     "four more compiles (1 and 2 unrolled layers, accumulation 1 and 2).")
_MEMORY_TABLE = flags.DEFINE_list("memory_table", [], "Memory sizes in GB: print the choices per size.")
_MIN_MICRO_TOKENS = flags.DEFINE_integer(
    "min_micro_tokens", 4096, "--memory_table suggests micro-steps of at least this many tokens per device "
    "when one fits: the costs of a micro-step that do not shrink with it (FSDP's parameter all-gathers and "
    "gradient reduce-scatter) outweigh a few percent of recomputation below.", lower_bound=0)
flags.mark_flags_as_required(["config"])
flags.register_validator("mfu", lambda v: 0 < v <= 1, "--mfu is a fraction of the peak FLOP/s: in (0, 1], e.g. 0.4.")
flags.register_validator("usable_fraction", lambda v: 0 < v <= 1,
                         "--usable_fraction is a share of the device's memory: in (0, 1], e.g. 0.9.")
flags.register_validator("memory_table", lambda sizes: all(_positive_number(s) for s in sizes),
                         "--memory_table lists memory sizes in GB, each a number > 0: e.g. 16,24,40,80.")


def _positive_number(text: str) -> bool:
  try:
    return float(text) > 0 and math.isfinite(float(text))
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Per-device bytes of one compiled train step (one optimizer step)."""
  config: Config
  mesh_shape: dict[str, int]
  params: int
  optimizer: int  # opt_state.inner_opt_state: Adam moments (or Lion's momentum), clipping, norm
  accumulator: int  # opt_state.acc_grads of MultiSteps (0 where the state does without: init_opt_state)
  frozen: int  # LoRA: the base weights, an input of the step (0 without LoRA)
  temporary: int  # XLA temp buffers: activations kept for the backward pass, gradients, logits
  total: int  # everything live: arguments + outputs not aliased to them + temporaries
  compile_seconds: float
  compiled: object = dataclasses.field(repr=False)  # None: XLA:TPU refused it, out of HBM
  attention: str = "xla"  # the implementation the step was compiled with (model.attention resolved)

  @property
  def label(self) -> str:
    t, m = self.config.train, self.config.model
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    return (f"micro_batch_size={t.micro_batch_size} gradient_accumulation_steps={t.gradient_accumulation_steps} "
            f"remat={m.remat} mesh({mesh})")

  def overrides(self, original: Config) -> str:
    """The command-line overrides that turn `original` into this estimate's config."""
    changed = [(f"train.{k}", getattr(self.config.train, k)) for k in ("micro_batch_size", "gradient_accumulation_steps")
               if getattr(self.config.train, k) != getattr(original.train, k)]
    if self.config.model.remat != original.model.remat:
      changed.append(("model.remat", self.config.model.remat))
    changed += [(f"mesh.{k}", getattr(self.config.mesh, k)) for k in ("data", "fsdp", "tensor")
                if getattr(self.config.mesh, k) != getattr(original.mesh, k)]
    return " ".join(f"--config.{k}={v}" for k, v in changed)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def with_changes(config: Config, micro_batch_size: int | None = None, remat: str | None = None,
                 mesh: dict[str, int] | None = None, **model) -> Config:
  """The config with another micro-batch (accumulation adjusted to keep the global batch), remat, mesh
  or model fields."""
  t, m = config.train, config.model
  if micro_batch_size is not None:
    per_device = t.micro_batch_size * t.gradient_accumulation_steps
    t = dataclasses.replace(t, micro_batch_size=micro_batch_size,
                            gradient_accumulation_steps=per_device // micro_batch_size)
  m = dataclasses.replace(m, **({"remat": remat} if remat else {}), **model)
  new_mesh = dataclasses.replace(config.mesh, **mesh) if mesh else config.mesh
  return dataclasses.replace(config, train=t, model=m, mesh=new_mesh)


@dataclasses.dataclass(frozen=True)
class Target:
  """What is planned for: the devices compiled for and their figures."""
  devices: list  # simulated CPU devices, or the compile-only devices of a TPU slice or GPU machine
  name: str
  memory_gb: float
  peak_flops: float  # per device, bf16
  hbm_bandwidth: float | None = None  # bytes/s per device: a roofline when known (--topology)

  @property
  def platform(self) -> str:
    return self.devices[0].platform


def make_target(topology_name: str, num_slices: int, num_devices: int, device_kind: str,
                memory_gb: float = 0.0) -> Target:
  """The TPU slice or GPU machine `topology_name` (XLA:TPU or XLA:GPU compiles for it), else `num_devices` CPU
  devices standing in for `device_kind`."""
  if topology_name:
    devices = topology.devices(topology_name, num_slices)
    chip = topology.chip(devices[0])
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    return Target(devices, f"{topology_name}{slices}: {len(devices)} x {chip.name}",
                  memory_gb or chip.hbm_bytes / GB, chip.peak_flops, chip.hbm_bandwidth)
  name, device_memory = DEVICE_KINDS[device_kind]
  return Target(jax.devices()[:num_devices], f"{num_devices} x {device_kind}", memory_gb or device_memory,
                flop_count.spec_peak_flops(name))


def lower_step(config: Config, devices: list):
  """(the lowered train step, its TrainFunctions, Runtime)."""
  rt = runtime.setup(config, devices)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(config.train, max(config.train.num_train_steps, 1)))
    return fns.step_fn.lower(fns.abstract_state, rt.abstract_step_batch()), fns, rt


def compile_step(config: Config, devices: list):
  """The compiled train step."""
  return lower_step(config, devices)[0].compile()


# XLA:TPU refuses to compile a program larger than the chip's HBM, naming what it would need.
_HBM_OOM = re.compile(r"CompileTimeHbmOom.*?HLO temporaries \(([\d.]+)([KMGT])\)", re.S)


def estimate(config: Config, devices: list) -> Estimate:
  start = time.perf_counter()
  lowered, fns, rt = lower_step(config, devices)
  state = fns.abstract_state
  sizes = dict(config=config, mesh_shape=dict(rt.mesh.shape), params=device_bytes(state.params),
               optimizer=device_bytes(state.opt_state.inner_opt_state),
               accumulator=device_bytes(state.opt_state.acc_grads), attention=rt.config.model.attention,
               frozen=device_bytes(state.frozen) if state.frozen is not None else 0)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    found = _HBM_OOM.search(str(error))
    if not found:
      raise
    temporary = float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024
    return Estimate(**sizes, temporary=int(temporary), compiled=None,
                    total=int(temporary) + sizes["params"] + sizes["optimizer"] + sizes["accumulator"]
                    + sizes["frozen"],
                    compile_seconds=time.perf_counter() - start)
  return Estimate(**sizes, temporary=compiled.memory_analysis().temp_size_in_bytes, compiled=compiled,
                  total=hlo.live_bytes(compiled), compile_seconds=time.perf_counter() - start)


def flops_of(est: Estimate, devices: list) -> flop_count.StepFlops:
  """Model FLOPs (analytic), hardware FLOPs and bytes accessed (XLA, every layer and micro-batch: see
  flop_count.hardware_cost_per_device)."""
  data_parallel = est.mesh_shape["data"] * est.mesh_shape["fsdp"]
  compile_variant = lambda cfg: est.compiled if cfg == est.config and est.compiled else compile_step(cfg, devices)
  flops = flop_count.step_flops(est.config, len(devices), data_parallel, compile_variant)
  if est.attention in KERNELS:  # a custom call: XLA counts none of the kernel's work
    flops = dataclasses.replace(flops, hardware=flops.hardware + flops.attention)
  return flops


def model_flops(est: Estimate) -> flop_count.StepFlops:
  """The analytic FLOPs alone (no compiles); hardware 0 = not counted."""
  t = est.config.train
  dp = est.mesh_shape["data"] * est.mesh_shape["fsdp"]
  tokens = t.micro_batch_size * t.gradient_accumulation_steps * dp * t.seq_len
  return flop_count.StepFlops(model=float(flop_count.flops_per_token(est.config.model, t.seq_len).train * tokens),
                           hardware=0.0)


class Estimator:
  """Compiles each config once: the searches revisit candidates."""

  def __init__(self, devices: list):
    self.devices, self._cache = devices, {}

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def __call__(self, config: Config) -> Estimate:
    if config not in self._cache:
      self._cache[config] = estimate(config, self.devices)
    return self._cache[config]

  def tried(self) -> list[Estimate]:
    return list(self._cache.values())


def micro_batch_choices(config: Config) -> list[int]:
  """Micro-batch sizes that keep the global batch: divisors of the sequences per device, descending."""
  per_device = config.train.micro_batch_size * config.train.gradient_accumulation_steps
  return [m for m in range(per_device, 0, -1) if per_device % m == 0]


def largest_fitting(estimator: Estimator, config: Config, limit: float, sizes: list[int]) -> Estimate | None:
  """The largest micro-batch of `sizes` (descending) that fits in `limit` bytes, by bisection: memory
  grows with the micro-batch."""
  low, high = 0, len(sizes) - 1  # sizes[high] is the smallest
  if estimator(with_changes(config, micro_batch_size=sizes[high])).total > limit:
    return None
  while low < high:  # invariant: sizes[high] fits
    middle = (low + high) // 2
    if estimator(with_changes(config, micro_batch_size=sizes[middle])).total <= limit:
      high = middle
    else:
      low = middle + 1
  return estimator(with_changes(config, micro_batch_size=sizes[high]))


def alternatives(config: Config, num_devices: int) -> list[Config]:
  """What to try when the step does not fit, in order: the current remat and mesh, then each stronger
  remat, then all data-parallel devices on fsdp (parameters and optimizer state split over all)."""
  stronger = REMAT_ORDER[REMAT_ORDER.index(config.model.remat):]
  meshes = [None]
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  if mesh["data"] > 1 and config.model.d_model % (mesh["data"] * mesh["fsdp"]) == 0:
    meshes.append({"data": 1, "fsdp": mesh["data"] * mesh["fsdp"], "tensor": mesh["tensor"]})
  return [with_changes(config, remat=r, mesh=m) for m in meshes for r in stronger]


def search(estimator: Estimator, config: Config, limit: float) -> tuple[Estimate | None, list[Estimate]]:
  """The first alternative with the largest micro-batch that fits, and every estimate compiled on the way."""
  for candidate in alternatives(config, estimator.num_devices):
    sizes = [m for m in micro_batch_choices(candidate) if m <= candidate.train.micro_batch_size]
    found = largest_fitting(estimator, candidate, limit, sizes)
    if found is not None:
      return found, estimator.tried()
  return None, estimator.tried()


def _gb(n: float) -> str:
  return f"{n / GB:,.3f}"


def describe(est: Estimate, memory_gb: float, usable: float) -> list[str]:
  t = est.config.train
  dp = est.mesh_shape["data"] * est.mesh_shape["fsdp"]
  sequences = t.micro_batch_size * t.gradient_accumulation_steps * dp
  limit = memory_gb * GB * usable
  verdict = "fits" if est.total <= limit else "does NOT fit"
  return [
      "Mesh: " + " x ".join(f"{k}={v}" for k, v in est.mesh_shape.items()),
      f"Batch: micro_batch_size {t.micro_batch_size} x gradient_accumulation_steps "
      f"{t.gradient_accumulation_steps} x {dp} data-parallel devices = {sequences:,} sequences = "
      f"{sequences * t.seq_len:,} tokens per step",
      f"Model: {param_count(est.config.model):,} parameters; remat {est.config.model.remat}, compute "
      f"{est.config.model.dtype}, parameters {est.config.model.param_dtype}",
      "Memory per device (GB):",
      f"  parameters          {_gb(est.params):>9}",
      f"  optimizer state     {_gb(est.optimizer):>9}   (opt_state.inner_opt_state)",
      f"  accumulator         {_gb(est.accumulator):>9}   (opt_state.acc_grads: state only where the step scans "
      f"micro-batches into it)",
      *([f"  frozen base         {_gb(est.frozen):>9}   (LoRA: the weights the adapters adapt)"] if est.frozen else []),
      f"  temporary           {_gb(est.temporary):>9}   (activations, gradients, logits: XLA memory analysis)",
      f"  total               {_gb(est.total):>9}   of {memory_gb:g} GB, {usable:g} usable = "
      f"{limit / GB:,.3g} GB: {verdict}",
      f"Collectives per optimizer step and device: {hlo.describe(hlo.collectives(est.compiled.as_text()))}"
      if est.compiled else "Collectives: none compiled (XLA:TPU stopped: the temporaries above exceed the HBM)",
      f"Compiled in {est.compile_seconds:.1f} s",
  ]


def describe_speed(flops: flop_count.StepFlops, est: Estimate, target: Target, mfu: float) -> list[str]:
  t = est.config.train
  dp = est.mesh_shape["data"] * est.mesh_shape["fsdp"]
  tokens = t.micro_batch_size * t.gradient_accumulation_steps * dp * t.seq_len
  n, peak = len(target.devices), target.peak_flops
  seconds = flops.model / (n * peak * mfu)
  splash = (f"; the {est.attention} kernels, which XLA cannot see into, at the model count of attention"
            + (", and their memory traffic left out" if est.attention == "splash" else "")
            if est.attention in KERNELS else "")
  counted = ("3 x forward" if not est.config.model.lora_rank else
             "LoRA: frozen weights 2 x forward, adapters and attention scores 3 x")
  at_mfu = (f"At MFU {mfu:g} on {n} x {peak:.4g} FLOP/s: step time {seconds:.4g} s, "
            f"{tokens / seconds:,.0f} tokens/s ({tokens / seconds / n:,.0f} per device)")
  if not flops.hardware:  # not counted (--hardware_flops=false)
    return [f"FLOPs per step: {flops.model:.4g} model (analytic, {counted}, causal attention as half)", at_mfu]
  lines = [
      f"FLOPs per step: {flops.model:.4g} model (analytic, {counted}, causal attention as half), "
      f"{flops.hardware:.4g} hardware (XLA: remat recomputation, attention as computed, elementwise, "
      f"optimizer{splash}) = {flops.hardware / flops.model:.3f} x model",
      f"{at_mfu}, HFU {mfu * flops.hardware / flops.model:.3f}"]
  if target.hbm_bandwidth:
    # XLA:TPU's cost analysis leaves out work it cannot see (Pallas kernels; measured here, also part of
    # the matmuls it fuses with FSDP's all-gathers): compute is the larger of its count and the model's.
    work = max(flops.hardware, flops.model)
    compute, memory = work / n / peak, flops.bytes_accessed / n / target.hbm_bandwidth
    roofline = max(compute, memory)
    lines.append(
        f"Roofline per chip: {work / n:.4g} FLOPs ({'XLA' if work == flops.hardware else 'model'} count, "
        f"the larger) at {peak:.4g} FLOP/s = {compute:.4g} s, "
        f"{flops.bytes_accessed / n / GB:,.1f} GB accessed at {target.hbm_bandwidth / GB:,.0f} GB/s = "
        f"{memory:.4g} s: step time >= {roofline:.4g} s ({'compute' if compute >= memory else 'memory'}-bound), "
        f"<= {tokens / roofline:,.0f} tokens/s, MFU <= {flops.model / n / peak / roofline:.3f} "
        "(collectives and idle time not counted)")
  return lines


def note(target: Target) -> str:
  if target.platform == "tpu":
    return ("Note: memory, FLOPs, bytes and collectives are XLA:TPU's, from libtpu's compile for this "
            "slice; the runtime keeps some HBM for itself (hence the usable fraction).")
  if target.platform == "gpu":
    return ("Note: memory, FLOPs, bytes and collectives are XLA:GPU's, from the CUDA plugin's compile for this "
            "card (no GPU: no autotuning, and cuDNN's workspaces, sized by cuDNN on the machine, are not in "
            "the temporaries); JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (0.75 by default) of the "
            "memory: set it to --usable_fraction.")
  return ("Note: memory is XLA's analysis of the CPU compile of the same program: an estimate of GPU memory "
          "(its compiler fuses, schedules and rematerialises differently); keep a margin, or plan a TPU "
          "with --topology.")


def report(config: Config, target: Target, usable: float, mfu: float, hardware_flops: bool = True) -> list[str]:
  """The plan of one config, and if it does not fit, what would."""
  estimator = Estimator(target.devices)
  est = estimator(config)
  lines = [f"Plan: {target.name} ({target.memory_gb:g} GB, {target.peak_flops:.4g} bf16 FLOP/s peak per "
           f"device); attention {est.attention}", *describe(est, target.memory_gb, usable)]
  limit = target.memory_gb * GB * usable
  planned = est  # the step whose speed is projected: this one, or the suggestion that fits
  if est.total > limit:
    planned, tried = search(estimator, config, limit)
    lines.append("Does not fit. Tried (total GB per device):")
    lines += [f"  {e.label}: {_gb(e.total)}" + (" fits" if e.total <= limit else "") for e in tried]
    if planned is None:
      lines.append("Nothing tried fits: more devices, a larger fsdp or tensor axis, or a shorter seq_len.")
    else:
      lines.append(f"Suggestion: {planned.label} ({_gb(planned.total)} GB per device): {planned.overrides(config)}")
      lines += ["  " + line for line in describe(planned, target.memory_gb, usable)]
  if planned is not None:
    flops = flops_of(planned, target.devices) if hardware_flops else model_flops(planned)
    speed = describe_speed(flops, planned, target, mfu)
    lines += speed if planned is est else ["  " + line for line in speed]
  return lines + [note(target)]


def memory_table(config: Config, target: Target, sizes_gb: list[float], usable: float,
                 min_micro_tokens: int = 4096) -> list[str]:
  """Per memory size, the largest micro-batch of each remat policy that fits (same global batch), and
  each policy's hardware FLOPs. The suggestion: the least recomputation whose micro-step has at least
  `min_micro_tokens` tokens per device, else the largest micro-batch that fits."""
  estimator = Estimator(target.devices)
  limit = max(sizes_gb) * GB * usable
  totals = {}  # remat -> [(micro_batch_size, total bytes)], ascending micro-batch
  for remat in REMAT_ORDER:
    totals[remat] = []
    for micro in reversed(micro_batch_choices(config)):
      est = estimator(with_changes(config, micro_batch_size=micro, remat=remat))
      totals[remat].append((micro, est.total))
      if est.total > limit:
        break
  per_device = config.train.micro_batch_size * config.train.gradient_accumulation_steps
  ratio = {}
  for remat in REMAT_ORDER:
    small = estimator(with_changes(config, micro_batch_size=totals[remat][0][0], remat=remat))
    flops = flops_of(small, target.devices)
    ratio[remat] = flops.hardware / flops.model
  lines = ["| memory (GB) | " + " | ".join(f"remat={r} ({ratio[r]:.2f} x model FLOPs)" for r in REMAT_ORDER)
           + " | suggestion |", "|---" * (len(REMAT_ORDER) + 2) + "|"]
  for size in sizes_gb:
    cells, best = [], {}  # remat -> largest fitting micro-batch
    for remat in REMAT_ORDER:
      fitting = [(m, b) for m, b in totals[remat] if b <= size * GB * usable]
      if fitting:
        best[remat], total = fitting[-1]
        cells.append(f"{best[remat]} x {per_device // best[remat]} ({_gb(total)} GB)")
      else:
        cells.append("does not fit")
    large = [r for r in best if best[r] * config.train.seq_len >= min_micro_tokens]
    remat = large[0] if large else max(best, key=best.get, default=None)
    suggestion = (f"remat={remat}, micro_batch_size={best[remat]}, accumulation {per_device // best[remat]}"
                  if remat else "none")
    lines.append(f"| {size:g} | " + " | ".join(cells) + f" | {suggestion} |")
  return lines + ["", "Cells: micro_batch_size x gradient_accumulation_steps per device (total GB per device); "
                  f"usable fraction {usable:g}. Suggestion: the least recomputation with micro-steps of at "
                  f"least {min_micro_tokens} tokens per device, else the largest micro-batch.", note(target)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _TOPOLOGY.value and len(jax.devices()) < _DEVICES.value:
    raise app.UsageError(f"--devices={_DEVICES.value} but jax has {len(jax.devices())} devices: run this "
                         "file as a script, which sets XLA_FLAGS before jax starts.")
  try:
    config = from_config_dict(_CONFIG.value)
    target = make_target(_TOPOLOGY.value, _NUM_SLICES.value, _DEVICES.value, _DEVICE_KIND.value,
                         _MEMORY_GB.value)
    if _MEMORY_TABLE.value:
      lines = memory_table(config, target, [float(s) for s in _MEMORY_TABLE.value], _USABLE.value,
                           _MIN_MICRO_TOKENS.value)
    else:
      lines = report(config, target, _USABLE.value, _MFU.value, _HARDWARE_FLOPS.value)
  except ConfigError as error:
    sys.exit(f"plan.py: {error}")
  header = f"Config: {config_flags.get_config_filename(flags.FLAGS['config'])}"
  print("\n".join([header, *lines]), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
