"""TRL's GRPOTrainer on the problems scripts/benchmark_grpo_trl.py gives it, under .venv-hf (torch, transformers,
trl, peft; no jax):

  .venv-hf/bin/python scripts/trl_grpo.py SPEC.json

SPEC: {"model": a Hugging Face directory, "out": a directory, "train": [{"prompt", "answer"}] in the order of the
steps (prompts_per_step a step), "eval": [{"prompt", "answer"}], "prompt_ids": the project's ids of the first
train prompts, "settings": {steps, prompts_per_step, generations, completion_tokens, learning_rate, beta,
epsilon, temperature, lora_rank, lora_alpha, b1, b2, max_grad_norm, seed, threads, kl_bias_correction}};
with benchmark_grpo_trl.py --common_draws also "init_adapters" (an .npz of the adapters to start from, by PEFT
name) and "draws" (an .npy [steps, tokens, rows] of the uniform numbers each step's tokens are drawn from).

Each prompt is the user's message, rendered by TRL with the model's chat template (checked against the project's
ids); the reward is the project's own `lm.training.rewards.last_number`, imported (it needs numpy alone); the
adapters are initialised as the project's. Greedy
exact match of the eval problems before and after training, with transformers' generate. Writes out/trl.json:
{"eval_before", "eval_after": {"exact_match", "finished", "completion_length", "seconds"}, "steps": [{"reward",
"kl", "completion_length", "seconds", "generation_seconds"}], "versions"}; out/trl_rollouts.npz, what each step
trained on, out/trl_policies.npz, the adapters that sampled each step's completions, out/trl_init.npz and
out/trl_adapters.npz, the adapters it started and ended with (`_save`).
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.training import rewards  # noqa: E402  (numpy alone)


def messages(prompt: str) -> list[dict]:
  return [{"role": "user", "content": prompt}]


def greedy_eval(model, tokenizer, problems: list[dict], new_tokens: int, torch) -> dict:
  """Exact match (the last number is the answer) of greedy completions, the share that ended by themselves."""
  started = time.perf_counter()
  model.eval()  # after training: no activation checkpointing, the KV cache on
  tokenizer.padding_side = "left"
  texts = [tokenizer.apply_chat_template(messages(p["prompt"]), add_generation_prompt=True, tokenize=False)
           for p in problems]
  inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
  new = out[:, inputs.input_ids.shape[1]:].tolist()
  stop = tokenizer.eos_token_id
  lengths = [row.index(stop) + 1 if stop in row else len(row) for row in new]
  completions = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, lengths)]
  correct = rewards.last_number(completions, [p["answer"] for p in problems])
  return {"exact_match": sum(correct) / len(problems), "finished": sum(stop in r for r in new) / len(problems),
          "completion_length": sum(lengths) / len(problems), "seconds": time.perf_counter() - started,
          "completions": completions[:4]}


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  s = spec["settings"]
  import torch
  torch.set_num_threads(s["threads"])
  import datasets
  import peft
  import transformers
  import trl

  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
  for prompt, ids in zip(spec["train"], spec["prompt_ids"]):  # the same prompts, token for token
    theirs = list(tokenizer.apply_chat_template(messages(prompt["prompt"]), add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
    if theirs != ids:
      raise SystemExit(f"TRL's chat prompt differs from the project's:\n{theirs}\n{ids}")
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
  model.generation_config.eos_token_id = tokenizer.eos_token_id
  report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "peft": peft.__version__}}
  report["eval_before"] = greedy_eval(model, tokenizer, spec["eval"], s["completion_tokens"], torch)
  print("TRL eval before:", report["eval_before"], flush=True)

  args = trl.GRPOConfig(
      output_dir=os.path.join(spec["out"], "trl_run"), max_steps=s["steps"], per_device_train_batch_size=(
          s["prompts_per_step"] * s["generations"]), gradient_accumulation_steps=1,
      num_generations=s["generations"], max_completion_length=s["completion_tokens"],
      learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=s["b1"], adam_beta2=s["b2"], max_grad_norm=s["max_grad_norm"], beta=s["beta"],
      epsilon=s["epsilon"], temperature=s["temperature"], loss_type="dapo", scale_rewards="group",
      use_bias_correction_kl=s.get("kl_bias_correction", True),
      shuffle_dataset=False, seed=s["seed"], logging_steps=1, save_strategy="no", report_to="none",
      use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0,
      activation_checkpointing=False)  # TRL's default recomputes the forward pass: not the project's remat "none"
  train = datasets.Dataset.from_list([{"prompt": messages(p["prompt"]), "answer": p["answer"]} for p in spec["train"]])

  def last_number(completions, answer, **unused):
    return rewards.last_number([c[-1]["content"] for c in completions], answer)

  lora = peft.LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  trainer = trl.GRPOTrainer(model=model, reward_funcs=last_number, args=args, train_dataset=train,
                            processing_class=tokenizer, peft_config=lora)
  if "init_adapters" in spec:  # benchmark_grpo_trl.py --common_draws: the project's own
    _copy_adapters(trainer.model, dict(np.load(spec["init_adapters"])), torch)
  else:
    _project_lora_init(trainer.model, s["seed"], torch)
  if "draws" in spec:
    _drawing_from(trainer, np.load(spec["draws"]), torch)
  np.savez(os.path.join(spec["out"], "trl_init.npz"), **_adapters(trainer.model))
  steps, rollouts, policies = _timed(trainer, transformers)
  trainer.train()
  _save(trainer, rollouts, policies, spec["out"])
  logged = [h for h in trainer.state.log_history if "reward" in h]
  report["steps"] = [{"reward": h["reward"], "kl": h.get("kl"), "completion_length": h["completions/mean_length"],
                      **t} for h, t in zip(logged, steps)]
  report["eval_after"] = greedy_eval(trainer.model, tokenizer, spec["eval"], s["completion_tokens"], torch)
  print("TRL eval after:", report["eval_after"], flush=True)
  with open(os.path.join(spec["out"], "trl.json"), "w") as f:
    json.dump(report, f, indent=1)


def _project_lora_init(model, seed: int, torch) -> None:
  """The project's LoRA initialisation (lm.model.lora: A ~ N(0, 1/fan_in), B = 0) instead of PEFT's
  (A ~ U(+-1/sqrt(fan_in)), a third of the variance): with the same learning rate, the same adapters."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if "lora_A" in name:  # [rank, fan_in]
        weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[1] ** -0.5)


def _copy_adapters(model, adapters: dict[str, np.ndarray], torch) -> None:
  """The model's LoRA weights set to `adapters` (by PEFT name), every one of them."""
  mine = {name: w for name, w in model.named_parameters() if "lora_" in name}
  if set(mine) != set(adapters):
    raise SystemExit(f"init_adapters: {sorted(set(mine) ^ set(adapters))[:4]} ... are not the model's adapters")
  with torch.no_grad():
    for name, w in mine.items():
      w.copy_(torch.from_numpy(adapters[name]))


def _drawing_from(trainer, draws: np.ndarray, torch) -> None:
  """Each step's completions drawn from draws[step, token, row] by inverse-CDF sampling (the formula of
  benchmark_grpo_trl.py's `inverse_cdf`) in place of torch.multinomial, which transformers' sampling calls
  once per token with the probabilities of every row."""
  at = {"step": -1, "token": 0}
  multinomial, inner = torch.multinomial, trainer._generate_and_score_completions

  def draw(probs, num_samples=1, *args, **kwargs):
    if probs.shape[0] != draws.shape[2] or num_samples != 1:
      raise SystemExit(f"common draws: {draws.shape[2]} rows a step, sampling asked for {tuple(probs.shape)}")
    u = torch.from_numpy(draws[at["step"], at["token"]]).to(probs.dtype)
    at["token"] += 1
    cdf = probs.cumsum(-1)
    return (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)[:, None]

  def generate_and_score(*args, **kwargs):
    at["step"], at["token"] = at["step"] + 1, 0
    torch.multinomial = draw
    try:
      return inner(*args, **kwargs)
    finally:
      torch.multinomial = multinomial
  trainer._generate_and_score_completions = generate_and_score


def _timed(trainer, transformers) -> tuple[list[dict], list[dict], list[dict]]:
  """Per optimizer step: its seconds, and those of generating and scoring its completions (TRL's
  _generate_and_score_completions: generation, rewards, the reference's log-probabilities); the rollout it
  trained on; the adapters that sampled it."""
  steps, generation, rollouts, policies = [], [], [], []
  inner = trainer._generate_and_score_completions

  def generate_and_score(*args, **kwargs):
    policies.append(_adapters(trainer.model))  # the adapters that sample this step's completions
    started = time.perf_counter()
    out = inner(*args, **kwargs)
    generation.append(time.perf_counter() - started)
    rollouts.append({k: out[k].detach().cpu().numpy() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                 "completion_mask", "advantages") if k in out})
    return out
  trainer._generate_and_score_completions = generate_and_score

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      steps.append({"seconds": time.perf_counter() - self.started, "generation_seconds": sum(generation)})
      generation.clear()
  trainer.add_callback(Timer())
  return steps, rollouts, policies


def _adapters(model) -> dict:
  """The LoRA weights by PEFT name, copied (a CPU tensor's .numpy() is a view of the live parameter)."""
  return {name: w.detach().cpu().numpy().copy() for name, w in model.named_parameters() if "lora_" in name}


def _save(trainer, rollouts: list[dict], policies: list[dict], out: str) -> None:
  """out/trl_rollouts.npz: each step's prompts, completions, masks and advantages (step{i}/{name}, as
  TRL's _generate_and_score_completions made them); out/trl_policies.npz: the adapters each step's completions
  were sampled with (step{i}/{name}); out/trl_adapters.npz: the trained adapters by PEFT name (out/trl_init.npz:
  those it started from). scripts/grpo_trl_gradients.py --replay reads them."""
  np.savez(os.path.join(out, "trl_rollouts.npz"), **_by_step(rollouts))
  np.savez(os.path.join(out, "trl_adapters.npz"), **_adapters(trainer.model))
  np.savez(os.path.join(out, "trl_policies.npz"), **_by_step(policies))


def _by_step(steps: list[dict]) -> dict:
  """One array per step and name, keyed step{i}/{name} (scripts/grpo_trl_gradients.py's `by_step` reads them)."""
  return {f"step{i}/{k}": v for i, arrays in enumerate(steps) for k, v in arrays.items()}


if __name__ == "__main__":
  main(sys.argv[1])
