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


def run_project(config, workdir: str) -> dict:
  """The project's run (main.py's training, in this process) and its figures from metrics.jsonl."""
  import jax
  from lm.training import metrics, train
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  steps, evals = metrics.read_jsonl(workdir), metrics.read_jsonl(workdir, "eval")
  first, last = evals[0], evals[max(evals)]
  return {"eval_before": _project_eval(first), "eval_after": _project_eval(last),
          "steps": [{"reward": r["reward_mean"], "kl": r.get("kl"), "completion_length": r["completion_length"],
                     "seconds": r.get("step_time"), "generation_seconds": r["generation_seconds"]}
                    for _, r in sorted(steps.items())]}


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
  results = {}
  for side in ("project", "trl"):
    path = os.path.join(workdir, f"{side}.json")
    if _ONLY.value in ("both", side):
      if side == "project":
        results[side] = run_project(config, os.path.join(workdir, "project"))
      else:
        export(_IMPORT.value, os.path.join(workdir, "hf"))
        results[side] = run_trl(trl_spec(config, os.path.join(workdir, "hf"), workdir), workdir)
      with open(path, "w") as f:
        json.dump(results[side], f, indent=1)
    elif os.path.exists(path):
      with open(path) as f:
        results[side] = json.load(f)
  completions = _PROMPTS.value * _GENERATIONS.value
  table = {side: summary(r, completions) for side, r in results.items()}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(table, f, indent=1)
  print(f"\nGRPO on {_IMPORT.value}: {_STEPS.value} steps x {_PROMPTS.value} prompts x {_GENERATIONS.value} "
        f"generations, <= {_TOKENS.value} tokens, temperature {_TEMPERATURE.value:g}, lr {_LR.value:g}, beta "
        f"{_BETA.value:g}; greedy exact match on "
        f"{_EVAL.value} held-out problems")
  print("| figure | " + " | ".join(table) + " |\n|---|" + "---|" * len(table))
  for figure in next(iter(table.values())):
    print(f"| {figure} | " + " | ".join(_cell(t[figure]) for t in table.values()) + " |")
  for side, r in results.items():
    print(f"{side} train rewards per step: " + " ".join(f"{s['reward']:.3f}" for s in r["steps"]))


def _cell(value) -> str:
  return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  app.run(main)
