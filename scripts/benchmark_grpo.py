"""GRPO's two halves, timed apart: completions per second of the sampler, and of the policy update.

  python scripts/benchmark_grpo.py --config=configs/gemma3_270m_grpo.py [--steps=5] [--config.x=...]

Runs --steps GRPO steps of the config on this machine's devices from a random initialisation (LoRA's base
random too: the figures are of the computation, not of a trained model), the first one for compilation
only. Per step: the rollout (generation: prefill + the cache loop of max_completion_tokens; the
log-probabilities of the reference with beta > 0, of the sampling policy with num_iterations > 1) and the
update (the train step). Prints the medians and completions/s of each, and the update's tokens/s.
scripts/benchmark_grpo_trl.py trains a real model and compares it with TRL.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from lm import config_file  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A GRPO config (configs/*_grpo.py).")
_STEPS = flags.DEFINE_integer("steps", 4, "GRPO steps timed after the first (compilation).", lower_bound=1)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax  # after absl has parsed the flags
  from lm.config import from_config_dict
  from lm.model import sharding
  from lm.training import grpo, runtime
  from lm.training.optimizer import make_optimizer

  config = from_config_dict(_CONFIG.value)
  rt = runtime.setup(config)
  kind = grpo.make(rt)
  sampler, g = kind.sampler, config.grpo
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(config.train, _STEPS.value + 1), losses=kind.losses)
    state = fns.create_state()
  kind.start(fns, state, resumed=False)
  times = {"rollout": [], "update": []}
  for step in range(_STEPS.value + 1):
    batch, figures = kind.batch(step, state)
    started = time.perf_counter()
    with sharding.activate(rt.mesh):
      state, out = fns.step_fn(state, sharding.put_step_batch(batch, rt.mesh))
      jax.block_until_ready(out)
    if step:  # the first step compiles
      times["rollout"].append(figures["generation_seconds"])
      times["update"].append(time.perf_counter() - started)
  rows, tokens = rt.plan.global_sequences, rt.plan.tokens_per_step
  rollout, update = statistics.median(times["rollout"]), statistics.median(times["update"])
  print(f"Config: {config.model.name}, {rows} completions per step ({rows // g.num_generations} prompts x "
        f"{g.num_generations}), {g.max_completion_tokens} new tokens at most, {rt.mesh.devices.size} x "
        f"{rt.mesh.devices.flat[0].device_kind}")
  print(f"rollout (generation + log-probability passes): {rollout:.3f} s median = {rows / rollout:,.1f} "
        "completions/s")
  print(f"update (one optimizer step): {update:.3f} s median = {rows / update:,.1f} completions/s, "
        f"{tokens / update:,.0f} tokens/s")


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
