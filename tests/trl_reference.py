"""TRL's GRPO loss and its LoRA gradient on given completions, run under .venv-hf by tests/test_grpo_trl.py (and
scripts/grpo_trl_gradients.py on a real model).

  .venv-hf/bin/python tests/trl_reference.py SPEC.json

SPEC: {"model": a Hugging Face directory (with its tokenizer), "out": a directory, "prompts": [[ids]],
"completions": [[ids]] (one per prompt row; a completion ends with an end-of-sequence id or is truncated),
"advantages": [float], "adapters": an .npz of PEFT's LoRA weights by parameter name (lora_A [rank, in],
lora_B [out, rank]), "settings": {"beta", "epsilon", "temperature", "lora_rank", "lora_alpha",
"kl_bias_correction" (TRL's use_bias_correction_kl; default True, as TRL's)}}.

The inputs are laid out as TRL's `_generate_and_score_completions` lays out its own (prompts left-padded,
completions right-padded with the pad id, their masks, the reference's log-probabilities with the adapters
disabled, num_items_in_batch), and the loss is TRL's own `GRPOTrainer.compute_loss` ("dapo", one optimizer
step per generation batch, as scripts/trl_grpo.py trains). Writes out/trl_gradients.npz: "loss", the per-token
log-probabilities "logps" [rows, longest completion], and each adapter's gradient under its PEFT name.

With "steps": [{"prompts", "completions", "advantages"}] and "optimizer": {"learning_rate", "b1", "b2", "eps",
"weight_decay", "max_grad_norm"} in SPEC, it trains instead: one optimizer step on each of those batches in
turn, as TRL's Trainer makes them (compute_loss, backward, the gradient clipped by its global norm, AdamW at a
constant learning rate), the reference's log-probabilities of each batch with the adapters disabled. Writes
out/trl_trained.npz: the adapters after the last step under their PEFT names, and "losses" [steps].
"""

import json
import os
import sys

import numpy as np


def pad(rows: list[list[int]], value: int, left: bool, torch):
  width = max(len(r) for r in rows)
  ids = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
  mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
  return torch.tensor(ids), torch.tensor(mask)


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  import torch
  torch.set_num_threads(os.cpu_count())
  trainer, named, lora_names = load_trainer(spec, torch)
  if "steps" in spec:
    train(trainer, named, lora_names, spec, torch)
  else:
    one_gradient(trainer, named, lora_names, spec, torch)


def load_trainer(spec: dict, torch):
  """TRL's GRPOTrainer on the model with PEFT's adapters set to SPEC's: (trainer, its named parameters, the
  adapters' names)."""
  import datasets
  import peft
  import transformers
  import trl

  s, opt = spec["settings"], spec.get("optimizer", {})
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
  batches = spec.get("steps", [spec])
  args = trl.GRPOConfig(
      output_dir=os.path.join(spec["out"], "trl_run"), per_device_train_batch_size=len(batches[0]["prompts"]),
      num_generations=2, max_completion_length=max(len(c) for b in batches for c in b["completions"]),
      beta=s["beta"], epsilon=s["epsilon"], temperature=s["temperature"], loss_type="dapo", use_cpu=True,
      bf16=False, use_bias_correction_kl=s.get("kl_bias_correction", True), report_to="none",
      activation_checkpointing=False, learning_rate=opt.get("learning_rate", 1e-6), lr_scheduler_type="constant",
      warmup_steps=0, weight_decay=opt.get("weight_decay", 0.0), adam_beta1=opt.get("b1", 0.9),
      adam_beta2=opt.get("b2", 0.999), adam_epsilon=opt.get("eps", 1e-8),
      max_grad_norm=opt.get("max_grad_norm", 1.0), max_steps=len(batches))
  train_set = datasets.Dataset.from_list([{"prompt": "unused"}] * 2)
  lora = peft.LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **unused: [0.0] * len(completions),
                            args=args, train_dataset=train_set, processing_class=tokenizer, peft_config=lora)
  adapters = np.load(spec["adapters"])
  named = dict(trainer.model.named_parameters())
  with torch.no_grad():
    for name, value in adapters.items():
      named[name].copy_(torch.from_numpy(value))
  lora_names = [n for n in named if "lora_" in n]
  if sorted(lora_names) != sorted(adapters):
    raise SystemExit(f"adapters differ from PEFT's: {sorted(set(lora_names) ^ set(adapters))[:4]}")
  trainer.current_gradient_accumulation_steps = 1
  return trainer, named, lora_names


def step_inputs(trainer, batch: dict, torch) -> tuple[dict, tuple]:
  """(compute_loss's inputs for a batch of prompts and completions, (input ids, attention mask, width))."""
  pad_id = trainer.processing_class.pad_token_id
  prompt_ids, prompt_mask = pad(batch["prompts"], pad_id, True, torch)
  completion_ids, completion_mask = pad(batch["completions"], pad_id, False, torch)
  input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
  width = completion_ids.shape[1]
  with torch.no_grad(), trainer.model.disable_adapter():
    ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
  inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor(batch["advantages"], dtype=torch.float32),
            "num_items_in_batch": completion_mask.sum(), "ref_per_token_logps": ref}
  return inputs, (input_ids, attention_mask, width)


def one_gradient(trainer, named, lora_names, spec: dict, torch) -> None:
  inputs, (input_ids, attention_mask, width) = step_inputs(trainer, spec, torch)
  trainer.model.train()
  loss = trainer.compute_loss(trainer.model, inputs)
  loss.backward()
  with torch.no_grad():
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
  out = {"loss": np.float64(loss.item()), "logps": logps.numpy(), "ref_logps": inputs["ref_per_token_logps"].numpy(),
         **{name: named[name].grad.numpy() for name in lora_names}}
  np.savez(os.path.join(spec["out"], "trl_gradients.npz"), **out)
  print(json.dumps({"loss": loss.item()}))


def train(trainer, named, lora_names, spec: dict, torch) -> None:
  """An optimizer step on each batch of SPEC's "steps", as Trainer's training loop makes it."""
  trainer.create_optimizer_and_scheduler(num_training_steps=len(spec["steps"]))
  model, losses = trainer.model, []
  for batch in spec["steps"]:
    inputs, _ = step_inputs(trainer, batch, torch)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    trainer.accelerator.backward(loss)
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    losses.append(loss.item())
  np.savez(os.path.join(spec["out"], "trl_trained.npz"), losses=np.asarray(losses),
           **{name: named[name].detach().numpy() for name in lora_names})
  print(json.dumps({"losses": losses}))


if __name__ == "__main__":
  main(sys.argv[1])
