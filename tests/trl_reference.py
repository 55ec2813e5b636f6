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
  s = spec["settings"]
  import datasets
  import peft
  import torch
  import transformers
  import trl

  torch.set_num_threads(os.cpu_count())
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
  args = trl.GRPOConfig(
      output_dir=os.path.join(spec["out"], "trl_run"), per_device_train_batch_size=len(spec["prompts"]),
      num_generations=2, max_completion_length=max(len(c) for c in spec["completions"]), beta=s["beta"],
      epsilon=s["epsilon"], temperature=s["temperature"], loss_type="dapo", use_cpu=True, bf16=False,
      use_bias_correction_kl=s.get("kl_bias_correction", True),
      report_to="none", activation_checkpointing=False)
  train = datasets.Dataset.from_list([{"prompt": "unused"}] * 2)
  lora = peft.LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **unused: [0.0] * len(completions),
                            args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
  adapters = np.load(spec["adapters"])
  named = dict(trainer.model.named_parameters())
  with torch.no_grad():
    for name, value in adapters.items():
      named[name].copy_(torch.from_numpy(value))
  lora_names = [n for n in named if "lora_" in n]
  if sorted(lora_names) != sorted(adapters):
    raise SystemExit(f"adapters differ from PEFT's: {sorted(set(lora_names) ^ set(adapters))[:4]}")

  prompt_ids, prompt_mask = pad(spec["prompts"], tokenizer.pad_token_id, True, torch)
  completion_ids, completion_mask = pad(spec["completions"], tokenizer.pad_token_id, False, torch)
  input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
  width = completion_ids.shape[1]
  with torch.no_grad(), trainer.model.disable_adapter():
    ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
  inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor(spec["advantages"], dtype=torch.float32),
            "num_items_in_batch": completion_mask.sum(), "ref_per_token_logps": ref}
  trainer.model.train()
  trainer.current_gradient_accumulation_steps = 1
  loss = trainer.compute_loss(trainer.model, inputs)
  loss.backward()
  with torch.no_grad():
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
  out = {"loss": np.float64(loss.item()), "logps": logps.numpy(), "ref_logps": ref.numpy(),
         **{name: named[name].grad.numpy() for name in lora_names}}
  np.savez(os.path.join(spec["out"], "trl_gradients.npz"), **out)
  print(json.dumps({"loss": loss.item(), "trl": trl.__version__, "peft": peft.__version__}))


if __name__ == "__main__":
  main(sys.argv[1])
