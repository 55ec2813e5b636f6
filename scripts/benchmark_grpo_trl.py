"""GRPO on a real instruct model, the project against TRL's GRPOTrainer on the same model, task and settings.

  python scripts/benchmark_grpo_trl.py [--import_dir=ckpt/smollm2] [--steps=16] [--completion_tokens=128]
                                      [--seed=0 --workdir=runs/grpo_vs_trl]

The import (scripts/convert_hf.py import --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=ckpt/smollm2) is trained
by configs/imported_grpo.py (LoRA, chat prompts of lm.training.rewards.word_problems, reward
lm.training.rewards.last_number alone: no reward for the format) with the settings below, then exported to a
Hugging Face directory that scripts/trl_grpo.py trains under .venv-hf with TRL (the same prompts in the same
order, reward function, prompts per step, generations, completion length, LoRA, learning rate, Adam betas,
gradient clip, beta, epsilon, temperature; TRL's "dapo" loss, the project's: the mean over every completion
token of the step). Both score greedy completions of the same --eval_prompts held-out problems before and
after. Prints the side-by-side table: exact match before/after, the share of completions that ended by
themselves, the KL at the end, seconds per step (medians after the first), completions/s of generation and of
the update. The two run one after the other, each on all the machine's cores; figures are written to
WORKDIR/summary.json.

--common_draws: a paired comparison. Each side's single run differs from the other's by the luck of its
sampling as much as by anything else (on one seed, another sampling stream moved the rise by 0.03-0.05). With
this flag both start from the project's initial adapters (TRL's are copied from them) and draw token i of
completion r of step s by inverse-CDF sampling from the same uniform number, WORKDIR/common_draws.npy[s, i, r]:
the project's sampler through a host callback in place of its Gumbel draw, TRL's in place of torch.multinomial.
Both are exact draws from the policy at the temperature. Two implementations of the same algorithm then
sample the same completions as long as their policies agree to rounding, and part only where rounding flips a
draw; the per-step lengths and rewards show where.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IMPORT = flags.DEFINE_string("import_dir", "ckpt/smollm2", "The model, as scripts/convert_hf.py import wrote it.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/grpo_vs_trl", "Where both runs, the export and the summary go.")
_STEPS = flags.DEFINE_integer("steps", 16, "Optimizer steps of each run.", lower_bound=2)
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts per step.", lower_bound=1)
_GENERATIONS = flags.DEFINE_integer("generations", 8, "Completions per prompt.", lower_bound=2)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature of the completions.")
_TOKENS = flags.DEFINE_integer("completion_tokens", 128, "Tokens per completion at most.", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_prompts", 200, "Held-out problems scored greedily before and after.")
_LR = flags.DEFINE_float("learning_rate", 5e-4, "Constant learning rate of the LoRA adapters.")
_BETA = flags.DEFINE_float("beta", 0.04, "Weight of the KL penalty to the imported model.")
_SEED = flags.DEFINE_integer("seed", 0, "config.train.seed of both sides: the problems (training and held-out), "
                             "the adapters' initialisation and the sampling. Repeat the benchmark with several "
                             "seeds (and a --workdir each) to tell a difference from the spread of single runs.")
_COMMON = flags.DEFINE_bool("common_draws", False, "Both sides start from the same adapters and sample with the "
                            "same uniform numbers (see above): a paired comparison.")
_ONLY = flags.DEFINE_enum("only", "both", ["both", "project", "trl"], "Run one side (the other's figures are "
                          "read from WORKDIR when there).")


def project_config(seq_len: int):
  from configs import imported_grpo
  from lm.config import from_config_dict
  c = imported_grpo.get_config(_IMPORT.value)
  c.grpo.num_generations, c.grpo.max_completion_tokens, c.grpo.eval_prompts = (_GENERATIONS.value, _TOKENS.value,
                                                                               _EVAL.value)
  c.grpo.beta, c.grpo.temperature = _BETA.value, _TEMPERATURE.value
  c.train.seq_len = seq_len
  c.train.micro_batch_size, c.train.gradient_accumulation_steps = _PROMPTS.value * _GENERATIONS.value, 1
  c.train.learning_rate, c.train.num_train_steps = _LR.value, _STEPS.value
  c.train.seed = _SEED.value
  c.train.save_interval_steps = c.train.eval_interval_steps = _STEPS.value
  c.mesh.data, c.mesh.fsdp = 1, 1
  return from_config_dict(c)


def run_project(config, workdir: str, draws=None) -> dict:
  """The project's run (main.py's training, in this process) and its figures from metrics.jsonl; with `draws`
  (`common_draws`), its completions sampled from them."""
  import jax
  from lm.training import metrics, train
  sampled = drawing_from(draws) if draws is not None else []
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  if sampled:
    import numpy as np
    np.savez(os.path.join(os.path.dirname(workdir), "project_rollouts.npz"),
             **{f"step{i}/new_tokens": new for i, new in enumerate(sampled)})
  steps, evals = metrics.read_jsonl(workdir), metrics.read_jsonl(workdir, "eval")
  first, last = evals[0], evals[max(evals)]
  return {"eval_before": _project_eval(first), "eval_after": _project_eval(last),
          "steps": [{"reward": r["reward_mean"], "kl": r.get("kl"), "completion_length": r["completion_length"],
                     "seconds": r.get("step_time"), "generation_seconds": r["generation_seconds"]}
                    for _, r in sorted(steps.items())]}


def common_draws(seed: int, steps: int, tokens: int, rows: int):
  """Uniform numbers in [0, 1), [steps, tokens, rows]: those of token i of row r of step s's completions."""
  import numpy as np
  return np.random.default_rng([seed, 0xD2A5]).random((steps, tokens, rows), dtype=np.float32)


def inverse_cdf(probs_BxV, u_B):
  """The token whose cumulative probability first exceeds u of the total: a draw from probs when u is uniform
  (scripts/trl_grpo.py draws TRL's tokens with the same formula)."""
  import jax.numpy as jnp
  cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
  token_B = jnp.sum(cdf_BxV <= u_B[:, None] * cdf_BxV[:, -1:], axis=-1)
  return jnp.minimum(token_B, probs_BxV.shape[-1] - 1).astype(jnp.int32)


def drawing_from(draws) -> list:
  """The project's sampler (lm.model.sampling.next_token, at a temperature) drawing each token from `draws`:
  the rollouts' generate calls in order, each from its first token, through an ordered host callback. Returns
  the list to which each rollout's new tokens [rows, completion tokens] are added."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import io_callback
  from lm.model import sampling
  from lm.training import grpo
  at = {"step": -1, "token": 0}

  def uniforms() -> np.ndarray:
    at["token"] += 1
    return draws[at["step"], at["token"] - 1]

  gumbel = sampling.next_token

  def next_token(logits_BxV, rng, cfg):
    if cfg.temperature == 0:  # the greedy eval
      return gumbel(logits_BxV, rng, cfg)
    u_B = io_callback(uniforms, jax.ShapeDtypeStruct(logits_BxV.shape[:1], jnp.float32), ordered=True)
    return inverse_cdf(jax.nn.softmax(logits_BxV.astype(jnp.float32) / cfg.temperature, axis=-1), u_B)

  rollout, sampled = grpo.Sampler._generate, []

  def generate(self, params, prompts_BxP, lengths_B, rng, temperature: float, rows: int):
    if temperature == 0:
      return rollout(self, params, prompts_BxP, lengths_B, rng, temperature, rows)
    at["step"], at["token"] = at["step"] + 1, 0
    sampled.append(rollout(self, params, prompts_BxP, lengths_B, rng, temperature, rows))
    return sampled[-1]
  sampling.next_token, grpo.Sampler._generate = next_token, generate
  return sampled


def initial_adapters(config) -> dict:
  """The adapters the project's run starts from (its seed's), by PEFT name."""
  import jax
  from lm.model import sharding
  from lm.tools import hf
  from lm.training import runtime
  rt = runtime.setup(config, jax.devices()[:1])
  with sharding.activate(rt.mesh):
    adapters = jax.jit(lambda rng: sharding.strip_boxes(runtime.trainable(rt.init_params(rng), config.model)[0]))(
        rt.rng)
  return hf.to_peft(jax.tree.map(jax.device_get, adapters))


def same_completions(workdir: str, stop_ids: tuple[int, ...]) -> list[float]:
  """Per step, the share of completions the two sides sampled token for token alike (--common_draws: the
  project's completions, its new tokens up to their first stop id, against TRL's within its mask)."""
  import numpy as np
  from lm.training import grpo
  ours, theirs = (np.load(os.path.join(workdir, f"{side}_rollouts.npz")) for side in ("project", "trl"))
  shares = []
  for step in range(len(ours.files)):
    mine, _ = grpo.completions_of(ours[f"step{step}/new_tokens"], stop_ids)
    trl = [ids[:int(m.sum())].tolist() for ids, m in zip(theirs[f"step{step}/completion_ids"],
                                                          theirs[f"step{step}/completion_mask"])]
    shares.append(sum(a == b for a, b in zip(mine, trl)) / len(mine))
  return shares


def _project_eval(row: dict) -> dict:
  return {"exact_match": row["reward/last_number"], "finished": row["finished"],
          "completion_length": row["completion_length"]}


def trl_spec(config, hf_dir: str, out: str) -> dict:
  """What scripts/trl_grpo.py trains on: the project's prompts of each step, in order, and its settings."""
  from lm.data import corpus
  from lm.training import grpo
  task = grpo.make_task(config, corpus.load_tokenizer(config.data, config.model.vocab_size))
  count = _PROMPTS.value * _STEPS.value
  train, answers = task.problems(config.train.seed, "train", range(count), config.grpo)
  held, held_answers = task.problems(config.train.seed, "eval", range(_EVAL.value), config.grpo)
  ids, lengths, _ = task.prompts("train", range(8))
  t, g = config.train, config.grpo
  return {"model": hf_dir, "out": out,
          "train": [{"prompt": p, "answer": a} for p, a in zip(train, answers)],
          "eval": [{"prompt": p, "answer": a} for p, a in zip(held, held_answers)],
          "prompt_ids": [row[len(row) - n:].tolist() for row, n in zip(ids, lengths)],
          "settings": {"steps": _STEPS.value, "prompts_per_step": _PROMPTS.value, "generations": g.num_generations,
                       "completion_tokens": g.max_completion_tokens, "learning_rate": t.learning_rate,
                       "beta": g.beta, "kl_bias_correction": g.kl_bias_correction, "epsilon": g.epsilon,
                       "temperature": g.temperature, "lora_rank": config.model.lora_rank,
                       "lora_alpha": config.model.lora_alpha, "b1": t.b1,
                       "b2": t.b2, "max_grad_norm": t.max_grad_norm, "seed": t.seed, "threads": os.cpu_count()}}


def paired(spec: dict, config, workdir: str) -> dict:
  """`spec` with the project's initial adapters (WORKDIR/project_init.npz) and the common draws for TRL."""
  import numpy as np
  np.savez(os.path.join(workdir, "project_init.npz"), **initial_adapters(config))
  return {**spec, "init_adapters": os.path.join(workdir, "project_init.npz"),
          "draws": os.path.join(workdir, "common_draws.npy")}


def run_trl(spec: dict, out: str) -> dict:
  path = os.path.join(out, "spec.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  subprocess.run([os.path.join(ROOT, ".venv-hf/bin/python"), os.path.join(ROOT, "scripts/trl_grpo.py"), path],
                 check=True, cwd=ROOT)
  with open(os.path.join(out, "trl.json")) as f:
    return json.load(f)


def export(import_dir: str, hf_dir: str) -> None:
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/convert_hf.py"), "export",
                    f"--checkpoint={import_dir}", f"--out={hf_dir}"], check=True, cwd=ROOT)


def summary(side: dict, completions: int) -> dict:
  """The figures of one side's table column."""
  later = side["steps"][1:]  # the first step compiles (the project) or warms up (TRL)
  seconds = statistics.median(s["seconds"] for s in later)
  generation = statistics.median(s["generation_seconds"] for s in later)
  before, after = side["eval_before"], side["eval_after"]
  return {"exact match before": before["exact_match"], "exact match after": after["exact_match"],
          "rise": after["exact_match"] - before["exact_match"],
          "ended by themselves before": before["finished"], "ended by themselves after": after["finished"],
          "completion tokens after": after["completion_length"], "KL at the end": side["steps"][-1]["kl"],
          "train reward, first 4 steps": statistics.mean(s["reward"] for s in side["steps"][:4]),
          "train reward, last 4 steps": statistics.mean(s["reward"] for s in side["steps"][-4:]),
          "seconds per step": seconds, "completions/s, generation": completions / generation,
          "completions/s, update": completions / max(seconds - generation, 1e-9)}


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  config = project_config(seq_len=64 + _TOKENS.value)  # the chat prompts are at most 64 tokens
  draws = None
  if _COMMON.value:
    import numpy as np
    draws = common_draws(_SEED.value, _STEPS.value, _TOKENS.value, _PROMPTS.value * _GENERATIONS.value)
    np.save(os.path.join(workdir, "common_draws.npy"), draws)
  results = run_sides(config, workdir, draws)
  completions = _PROMPTS.value * _GENERATIONS.value
  table = {side: summary(r, completions) for side, r in results.items()}
  alike = None
  if _COMMON.value and len(results) == 2:
    from lm.data import corpus
    from lm.training import grpo
    alike = same_completions(workdir, grpo.make_task(config, corpus.load_tokenizer(
        config.data, config.model.vocab_size)).stop_ids)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({**table, **({"completions sampled alike, per step": alike} if alike else {})}, f, indent=1)
  print(f"\nGRPO on {_IMPORT.value}: {_STEPS.value} steps x {_PROMPTS.value} prompts x {_GENERATIONS.value} "
        f"generations, <= {_TOKENS.value} tokens, temperature {_TEMPERATURE.value:g}, lr {_LR.value:g}, beta "
        f"{_BETA.value:g}; greedy exact match on {_EVAL.value} held-out problems"
        + (" (common draws)" if _COMMON.value else ""))
  print("| figure | " + " | ".join(table) + " |\n|---|" + "---|" * len(table))
  for figure in next(iter(table.values())):
    print(f"| {figure} | " + " | ".join(_cell(t[figure]) for t in table.values()) + " |")
  if alike:
    print("completions sampled alike on both sides, per step: " + " ".join(f"{share:.3f}" for share in alike))
  for side, r in results.items():
    print(f"{side} train rewards per step: " + " ".join(f"{s['reward']:.3f}" for s in r["steps"]))
    print(f"{side} mean completion length per step: " + " ".join(f"{s['completion_length']:.2f}" for s in r["steps"]))


def run_sides(config, workdir: str, draws) -> dict:
  """Each side's figures: run (--only) or read from WORKDIR/<side>.json."""
  results = {}
  for side in ("project", "trl"):
    path = os.path.join(workdir, f"{side}.json")
    if _ONLY.value in ("both", side):
      if side == "project":
        results[side] = run_project(config, os.path.join(workdir, "project"), draws)
      else:
        export(_IMPORT.value, os.path.join(workdir, "hf"))
        spec = trl_spec(config, os.path.join(workdir, "hf"), workdir)
        results[side] = run_trl(paired(spec, config, workdir) if draws is not None else spec, workdir)
      with open(path, "w") as f:
        json.dump(results[side], f, indent=1)
    elif os.path.exists(path):
      with open(path) as f:
        results[side] = json.load(f)
  return results


def _cell(value) -> str:
  return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  app.run(main)
