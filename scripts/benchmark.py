"""Throughput of the project's train path next to a minimal jax.jit step, on synthetic tokens.

  python scripts/benchmark.py --config=configs/bench_60m.py

Measures the float32 and bfloat16 matmul peak of the machine (a 4096 x 4096 matmul), then runs each
variant (float32 / bfloat16 compute; accumulation 1 / 4 at the same global batch; the minimal step) for
--warmup + --steps optimizer steps, and prints one JSON line: per variant the median step time, tokens/s,
MFU against the measured peak of its dtype, compile time and peak resident memory, and the ratios that
show the framework's cost. The project path is `lm.training.train.loop` itself: the AOT-compiled sharded step
(one program per optimizer step, MultiSteps inside), the delayed metrics fetch, per-step logging, and an
asynchronous orbax save in the middle of the timed steps. Only the eval function is a stub (eval time is
not step time anyway). The host-loop path is the previous design, kept as a reference: k programs per
optimizer step fed by the host (k - 1 that add a micro-batch's gradient to the accumulator, one that adds
the last and updates), each step timed to its end. Runs without TensorFlow (then without TensorBoard).
--device_only_rounds=N then replays each variant's compiled programs alone (no host work), the variants
taking turns: the in-graph cost of the framework, robust to other load on the machine (the *_device_only
ratios use the fastest replay). Numbers and their analysis: docs/performance.md.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (after the path set-up)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from lm import config_file  # noqa: E402
from lm.checkpoints import checkpoint  # noqa: E402
from lm.config import Config, from_config_dict  # noqa: E402
from lm.data import batching, synthetic  # noqa: E402
from lm.model import sharding  # noqa: E402
from lm.model.decoder import Decoder  # noqa: E402
from lm.training import flop_count, metrics, next_token, runtime, train, train_step  # noqa: E402
from lm.training.optimizer import make_optimizer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed optimizer steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 0, "Untimed optimizer steps per variant after compilation (the "
                               "project path also never times its first step).")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (see VARIANTS); default the DEFAULT ones.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 4096, "Side of the square matmul that measures the peak.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the JSON line to this file.")
_DEVICE_ONLY_ROUNDS = flags.DEFINE_integer(
    "device_only_rounds", 0, "Afterwards, time this many optimizer steps of each variant's compiled "
    "programs alone (no host work, variants interleaved): robust to other load on the machine.")
flags.mark_flags_as_required(["config"])



@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  path: str  # "project" (lm.training.train's loop), "minimal" (a plain jax.jit step) or "hostloop" (k programs)
  dtype: str  # compute dtype
  accumulation: int  # micro-batches per optimizer step; the micro-batch shrinks to keep the global batch
  global_fraction: int = 1  # 4: a quarter of the global batch, to time one accumulation micro-step alone
  sft: bool = False  # SFT's rows: the loss on the answers only (a mask), else pre-training's
  invariant: bool = False  # config.train.batch_invariant (groups of one row)


# Per dtype: the minimal reference, the project at accumulation 1 and 4 (same global batch), and one
# project step on a quarter of the batch: the cost of accumulating 4 of those is accum4 / (4 x it).
VARIANTS = tuple(v for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")) for v in (
    Variant(f"minimal_{short}", "minimal", dtype, 1),
    Variant(f"project_{short}_accum1", "project", dtype, 1),
    Variant(f"project_{short}_accum4", "project", dtype, 4),
    Variant(f"project_{short}_accum1_quarter", "project", dtype, 1, global_fraction=4),
    Variant(f"hostloop_{short}_accum4", "hostloop", dtype, 4),
    Variant(f"project_{short}_sft", "project", dtype, 1, sft=True),
    # The cost of bit-identical training across splits: 8 x 1 and 1 x 8 rows, the mode off and on.
    Variant(f"project_{short}_accum8", "project", dtype, 8),
    Variant(f"project_{short}_accum1_invariant", "project", dtype, 1, invariant=True),
    Variant(f"project_{short}_accum8_invariant", "project", dtype, 8, invariant=True),
))
# About 5 minutes for bench_60m on 2 idle cores: the accumulation comparison in float32 only.
DEFAULT = ("minimal_f32", "project_f32_accum1", "project_f32_accum4", "project_f32_accum1_quarter",
           "hostloop_f32_accum4", "project_f32_sft", "minimal_bf16", "project_bf16_accum1")


def variant_config(config: Config, variant: Variant) -> Config:
  """The config with the variant's dtype and batch split; the global batch is the config's (or a part)."""
  t = config.train
  per_device_sequences = t.micro_batch_size * t.gradient_accumulation_steps // variant.global_fraction
  if per_device_sequences % variant.accumulation:
    raise ValueError(f"{variant.name}: {per_device_sequences} sequences per device do not split into "
                     f"{variant.accumulation} micro-batches")
  train_cfg = dataclasses.replace(t, micro_batch_size=per_device_sequences // variant.accumulation,
                                  gradient_accumulation_steps=variant.accumulation,
                                  batch_invariant=variant.invariant, batch_invariant_rows=1)
  return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=variant.dtype),
                             train=train_cfg)


class PeakRss:
  """Peak resident memory of this process since `reset`: Linux's VmHWM, which /proc/self/clear_refs
  resets; elsewhere getrusage's maximum over the whole process life."""

  def reset(self) -> float:
    """Starts a new peak; returns the resident memory now (MB), what earlier variants still hold."""
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    except OSError:
      pass
    return self._status("VmRSS") or 0.0

  def megabytes(self) -> float:
    return self._status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB

  @staticmethod
  def _status(key: str) -> float | None:
    try:
      with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
      return None


def _stub_eval(params, batch):
  """Eval is left out: the loop pauses the step timer for it, and its compile would lengthen the run."""
  del params
  rows = batch["tokens"].shape[0]
  return {"sequence_loss": np.zeros(rows, np.float32), "sequence_tokens": np.zeros(rows, np.int32)}


def run_project(config: Config, steps: int, warmup: int, workdir: str, peak: float,
                sft: bool = False) -> tuple[dict, Callable[[], None]]:
  """lm.training.train's loop on synthetic data, and a replay of its compiled program. The step times are those
  the loop's StepTimer logs to metrics.jsonl."""
  # +1: the loop times a step from the end of the one before, so the first step is never timed.
  num_steps = 1 + warmup + steps
  # One asynchronous save in the middle of the timed steps (its write overlaps them), one at the end.
  t = dataclasses.replace(config.train, log_interval_steps=1, eval_interval_steps=num_steps,
                          save_interval_steps=max(1 + warmup + steps // 2, 1))
  config = dataclasses.replace(config, train=t)
  rt = runtime.setup(config)
  sequences = synthetic.sequences(config, 4 * rt.plan.global_sequences, sft=sft)
  batches = batching.TrainBatches({"synthetic": sequences}, t.seed, rt.plan.global_sequences)
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(t, num_steps))
    state = fns.create_state()
    start = time.perf_counter()
    # Compiled ahead of time, so that the compile time is measured apart and no step carries it.
    abstract_batch = rt.abstract_step_batch(masked=sft)
    compiled = fns.step_fn.lower(fns.abstract_state, abstract_batch).compile()
    compile_seconds = time.perf_counter() - start
    checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), t)
    kind = next_token.NextToken(rt, batches, _stub_eval, batching.EvalBatches([sequences], rt.plan.micro_rows,
                                                                          rt.plan.micro_rows), lines=[])
    run = train.Run(config=config, workdir=workdir, rt=rt, step_fn=compiled, kind=kind, checkpoints=checkpoints,
                    num_train_steps=num_steps, peak_flops_per_device=peak,
                    tensorboard=importlib.util.find_spec("clu") is not None)
    train.loop(run, state)
    replay = _project_replay(fns.create_state, compiled, batches.get(0), rt)
  logged = metrics.read_jsonl(workdir)
  seconds = [logged[s]["step_time"] for s in sorted(logged) if "step_time" in logged[s]]
  return {"compile_seconds": compile_seconds, "step_times": seconds[warmup:],
          "xla_temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}, replay


def _project_replay(create_state, compiled, global_batch: dict, rt: runtime.Runtime) -> Callable[[], None]:
  """One optimizer step of the compiled program alone, its input already on the device: no host work.
  The state is made at the first call, so that it does not weigh on the memory of the variants after."""
  batch = sharding.put_step_batch(batching.micro_batches(global_batch, rt.plan), rt.mesh)
  holder = [None]

  def replay():
    if holder[0] is None:
      with sharding.activate(rt.mesh):
        holder[0] = create_state()
    holder[0], _ = compiled(holder[0], batch)
    jax.block_until_ready(holder[0])

  return replay


def host_loop_programs(rt: runtime.Runtime, tx) -> tuple[Callable, Callable]:
  """The previous design's two programs, (accumulate, update), each (state, micro-batch, loss scale) ->
  (state, figures): the gradient of one micro-batch added to MultiSteps' accumulator; and the last one's
  gradient handed to MultiSteps at its last mini-step, which adds it, updates and restarts."""
  def accumulate(state, micro, scale):
    grads, figures = train_step.gradient(rt.model, state.params, None, micro, scale)
    acc = jax.tree.map(lambda g, a: (g + a).astype(a.dtype), grads, state.opt_state.acc_grads)
    opt_state = state.opt_state._replace(mini_step=state.opt_state.mini_step + 1, acc_grads=acc)
    return state.replace(opt_state=opt_state), figures

  def update(state, micro, scale):
    grads, figures = train_step.gradient(rt.model, state.params, None, micro, scale)
    last = state.opt_state._replace(mini_step=jnp.asarray(rt.plan.accumulation_steps - 1, jnp.int32))
    updates, opt_state = tx.update(grads, last, state.params)
    return train_step.TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state), figures

  return tuple(jax.jit(f, donate_argnums=0) for f in (accumulate, update))


def run_host_loop(config: Config, steps: int, warmup: int) -> tuple[dict, Callable[[], None]]:
  """The previous design on the project's mesh: the host computes the loss scale, dispatches k programs
  per optimizer step and fetches the step's figures at its end (each step timed to its end)."""
  rt = runtime.setup(config)
  t = config.train
  batches = batching.TrainBatches({"synthetic": synthetic.sequences(config, 4 * rt.plan.global_sequences)}, t.seed,
                              rt.plan.global_sequences)
  with sharding.activate(rt.mesh):
    tx = make_optimizer(t, warmup + steps + 1)
    fns = runtime.train_functions(rt, tx)
    accumulate, update = host_loop_programs(rt, tx)
    state = fns.create_state()
    if state.opt_state.acc_grads is None:  # the previous design carried MultiSteps' accumulator between programs
      state = state.replace(opt_state=state.opt_state._replace(acc_grads=jax.tree.map(jnp.zeros_like, state.params)))

    def on_device(global_batch):
      micro = batching.micro_batches(global_batch, rt.plan)
      return ([sharding.put_batch({k: v[i] for k, v in micro.items()}, rt.mesh) for i in range(len(micro["tokens"]))],
              np.float32(1.0 / max(batching.loss_mask(global_batch["segment_ids"]).sum(), 1)))

    def programs(state, micro_batches, scale):
      for i, micro in enumerate(micro_batches):
        state, figures = (update if i == len(micro_batches) - 1 else accumulate)(state, micro, scale)
      return state, figures

    def one_step(state, global_batch):
      return programs(state, *on_device(global_batch))

    start = time.perf_counter()
    state, figures = one_step(state, batches.get(0))  # compiles both programs
    jax.block_until_ready(figures)
    compile_seconds, seconds = time.perf_counter() - start, []
    for s in range(1, warmup + steps + 1):
      start = time.perf_counter()
      state, figures = one_step(state, batches.get(s))
      jax.device_get(figures)
      seconds.append(time.perf_counter() - start)
    holder, first = [state], on_device(batches.get(0))

    def replay():
      holder[0], figures = programs(holder[0], *first)
      jax.block_until_ready(figures)

  return {"compile_seconds": compile_seconds, "step_times": seconds[warmup:], "xla_temp_mb": None}, replay


def minimal_step(config: Config):
  """The reference: what one would write by hand. Same model, loss and optimizer (AdamW, and clipping
  when the config clips: the workload, not the framework), one device, no sharding, accumulation, learning
  rate schedule or metrics. Returns (init, jitted step)."""
  t = config.train
  model = Decoder(config.model)
  tx = optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
  if t.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), tx)

  def init(rng, batch):
    params = nn.unbox(model.init(rng, batch["tokens"], batch["segment_ids"], batch["positions"])["params"])
    return params, tx.init(params)

  def loss_fn(params, batch):
    logits_BxLxV = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"])
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batching.targets(batch["tokens"]))
    mask_BxL = batching.loss_mask(batch["segment_ids"])
    return jnp.sum(ce_BxL * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(init), step


def run_minimal(config: Config, steps: int, warmup: int) -> tuple[dict, Callable[[], None]]:
  """The minimal step on the first device, on the project's global batch; each step timed to its end."""
  t = config.train
  global_sequences = t.micro_batch_size * t.gradient_accumulation_steps * len(jax.devices())
  batches = batching.TrainBatches({"synthetic": synthetic.sequences(config, 4 * global_sequences)}, t.seed,
                             global_sequences)
  init, step = minimal_step(config)
  params, opt_state = init(jax.random.key(t.seed), batches.get(0))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batches.get(0)).compile()
  compile_seconds = time.perf_counter() - start
  seconds = []
  for s in range(warmup + steps):
    batch = batches.get(s)
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch)
    loss.block_until_ready()
    seconds.append(time.perf_counter() - start)
  holder, device_batch = [params, opt_state], jax.device_put(batches.get(0))

  def replay():
    holder[0], holder[1], loss = compiled(holder[0], holder[1], device_batch)
    loss.block_until_ready()

  return {"compile_seconds": compile_seconds, "step_times": seconds[warmup:],
          "xla_temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}, replay


def measure(config: Config, variant: Variant, steps: int, warmup: int, peak: dict[str, float],
            rss: PeakRss) -> tuple[dict, Callable[[], None]]:
  """One variant: its figures, with tokens/s and MFU from the median step time, and its replay."""
  cfg = variant_config(config, variant)
  rss_before = rss.reset()
  if variant.path == "minimal":
    result, replay = run_minimal(cfg, steps, warmup)
  elif variant.path == "hostloop":
    result, replay = run_host_loop(cfg, steps, warmup)
  else:
    with tempfile.TemporaryDirectory() as workdir:
      result, replay = run_project(cfg, steps, warmup, workdir, peak[variant.dtype] / len(jax.devices()),
                                   sft=variant.sft)
  t = cfg.train
  tokens = t.micro_batch_size * t.gradient_accumulation_steps * len(jax.devices()) * t.seq_len
  median = float(np.median(result["step_times"]))
  flops = flop_count.flops_per_token(cfg.model, t.seq_len).train * tokens
  return {"name": variant.name, "path": variant.path, "dtype": variant.dtype,
          "micro_batch_size": t.micro_batch_size, "accumulation_steps": t.gradient_accumulation_steps,
          "tokens_per_step": tokens, "step_time_median": median, "step_time_min": min(result["step_times"]),
          "step_times": result["step_times"], "tokens_per_sec": tokens / median,
          # Against the whole machine's peak: simulated CPU devices share its cores.
          "mfu": flop_count.mfu(flops, median, 1, peak[variant.dtype]),
          "compile_seconds": result["compile_seconds"], "peak_rss_mb": rss.megabytes(),
          "rss_before_mb": rss_before,
          "xla_temp_mb": result["xla_temp_mb"]}, replay


def replay_interleaved(replays: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, float]]:
  """Time of one optimizer step of each variant's compiled programs alone (no host work): the variants
  take turns in a shuffled order, so that a change in the machine's load hits all of them alike; the
  minimum is the least disturbed run."""
  seconds = {name: [] for name in replays}
  order = random.Random(0)
  for _ in range(rounds):
    for name in order.sample(list(replays), len(replays)):
      start = time.perf_counter()
      replays[name]()
      seconds[name].append(time.perf_counter() - start)
  return {name: {"device_step_time_median": float(np.median(s)), "device_step_time_min": min(s)}
          for name, s in seconds.items()}


def ratios(results: dict[str, dict], key: str = "step_time_median", suffix: str = "") -> dict[str, float]:
  """The targets: project / minimal step time (<= 1 wanted), the cost of accumulating 4 micro-steps
  against 4 single steps of the same micro-batch (< 1.05 wanted), and the one-program step against the
  previous host loop at accumulation 4 (<= 1 wanted); the batch-invariant mode against the default at 1 x 8
  and 8 x 1 rows (its cost)."""
  out = {}
  for short in ("f32", "bf16"):
    names = {"minimal": f"minimal_{short}", "accum1": f"project_{short}_accum1",
             "accum4": f"project_{short}_accum4", "quarter": f"project_{short}_accum1_quarter",
             "hostloop": f"hostloop_{short}_accum4"}
    time_of = {k: results[name][key] for k, name in names.items() if key in results.get(name, {})}
    if {"minimal", "accum1"} <= set(time_of):
      out[f"project_over_minimal_{short}{suffix}"] = time_of["accum1"] / time_of["minimal"]
    if {"accum1", "accum4"} <= set(time_of):
      out[f"accum4_over_accum1_{short}{suffix}"] = time_of["accum4"] / time_of["accum1"]
    if {"accum4", "quarter"} <= set(time_of):
      out[f"accum4_over_4_quarter_steps_{short}{suffix}"] = time_of["accum4"] / (4 * time_of["quarter"])
    if f"project_{short}_sft" in results and key in results[f"project_{short}_sft"] and "accum1" in time_of:
      out[f"sft_over_pretraining_{short}{suffix}"] = results[f"project_{short}_sft"][key] / time_of["accum1"]
    if {"accum4", "hostloop"} <= set(time_of):
      out[f"accum4_over_hostloop_accum4_{short}{suffix}"] = time_of["accum4"] / time_of["hostloop"]
    for accumulation in (1, 8):  # the batch-invariant mode against the default at the same split
      plain, invariant = (results.get(f"project_{short}_accum{accumulation}{end}", {}) for end in ("", "_invariant"))
      if key in plain and key in invariant:
        out[f"invariant_over_default_accum{accumulation}_{short}{suffix}"] = invariant[key] / plain[key]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = from_config_dict(_CONFIG.value)
  names = _VARIANTS.value or DEFAULT
  unknown = sorted(set(names) - {v.name for v in VARIANTS})
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; known: {[v.name for v in VARIANTS]}")
  dtypes = {v.dtype for v in VARIANTS if v.name in names}
  # The peak of the whole machine: one matmul uses every core, whatever the simulated device count.
  measure_peak = lambda: {d: flop_count.measure_matmul_peak(jnp.dtype(d), _PEAK_SIZE.value, repeats=3)
                          for d in sorted(dtypes)}
  peak = measure_peak()
  load_before = os.getloadavg()[0]
  rss, results = PeakRss(), {}
  replays = {}
  for variant in VARIANTS:
    if variant.name in names:
      logging.info("Benchmarking %s", variant.name)
      results[variant.name], replays[variant.name] = measure(config, variant, _STEPS.value, _WARMUP.value,
                                                             peak, rss)
  if _DEVICE_ONLY_ROUNDS.value:
    logging.info("Replaying the compiled steps, %d rounds", _DEVICE_ONLY_ROUNDS.value)
    for name, figures in replay_interleaved(replays, _DEVICE_ONLY_ROUNDS.value).items():
      results[name].update(figures)
  del replays  # their states
  # Measured again at the end, the larger counts: other work on the machine only ever lowers it.
  peak_end = measure_peak()
  for result in results.values():
    best = max(peak[result["dtype"]], peak_end[result["dtype"]])
    result["mfu"] *= peak[result["dtype"]] / best
  peak_start, peak = peak, {d: max(peak[d], peak_end[d]) for d in peak}
  line = json.dumps({
      "config": config_flags.get_config_filename(flags.FLAGS["config"]), "devices": len(jax.devices()),
      "device_kind": jax.devices()[0].device_kind, "steps": _STEPS.value, "warmup": _WARMUP.value,
      "peak_flops": peak, "peak_flops_start_end": [peak_start, peak_end], "variants": list(results.values()),
      "ratios": {**ratios(results), **ratios(results, "device_step_time_min", "_device_only")},
      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      # Other work on the machine slows every figure: the 1-minute load average before and after.
      "load_average": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
  })
  print(line, flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
