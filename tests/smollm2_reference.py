"""What transformers does with real tokenizers and a real model, run under .venv-hf by tests/test_real_model.py.

  .venv-hf/bin/python tests/smollm2_reference.py SPEC.json

SPEC: {"out": dir, "texts": [str], "conversations": [[message]],
       "tokenizers": [{"name", "dir", "gguf": file name in dir (optional), "save": dir (optional)}],
       "model": {"dir", "gguf", "save", "prompts": [{"text": str} or {"messages": [message]}], "new_tokens"}}
Each tokenizer is read with AutoTokenizer (from the GGUF file when named) and, with "save", saved with
save_pretrained: the tokenizer files of the model's Hugging Face directory. The model (optional) is the
GGUF's, dequantized to float32 by transformers, copied into a fresh LlamaForCausalLM (transformers marks a
GGUF model quantized) and saved to its "save" directory. Writes out/reference.json:
  tokenizers: {name: {"ids": [{"plain": ids with add_special_tokens=False, "framed": ids of tokenizer(text)}]
                      for each text, "chat": [apply_chat_template(conversation, add_generation_prompt=True)]}}
  generated: [{"prompt": ids, "new": greedy ids of generate()}] and out/logits_<i>.npy (the float32 logits
  of each prompt) with a model.
"""

import json
import os
import sys

import numpy as np


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  import torch
  import transformers

  report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "tokenizers": {}}
  for entry in spec["tokenizers"]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(entry["dir"], gguf_file=entry.get("gguf"))
    if entry.get("save"):
      tokenizer.save_pretrained(entry["save"])
    report["tokenizers"][entry["name"]] = {
        "ids": [{"plain": tokenizer(t, add_special_tokens=False).input_ids, "framed": tokenizer(t).input_ids}
                for t in spec["texts"]],
        "chat": [_ids(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True))
                 for c in spec["conversations"]] if tokenizer.chat_template else None}
  if spec.get("model"):
    report["generated"] = generate(spec["model"], spec["out"], transformers, torch)
  with open(os.path.join(spec["out"], "reference.json"), "w") as f:
    json.dump(report, f)


def generate(spec: dict, out: str, transformers, torch) -> list[dict]:
  """Greedy continuations of the prompts by the GGUF's model, saved as a Hugging Face directory first."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["dir"], gguf_file=spec["gguf"])
  model = _float32_model(transformers, torch, spec["dir"], spec["gguf"])
  model.save_pretrained(spec["save"], safe_serialization=True)
  model.generation_config.save_pretrained(spec["save"])
  tokenizer.save_pretrained(spec["save"])
  generated = []
  for i, prompt in enumerate(spec["prompts"]):
    ids = (_ids(tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True))
           if "messages" in prompt else tokenizer(prompt["text"]).input_ids)
    tokens = torch.tensor([ids])
    with torch.no_grad():
      np.save(os.path.join(out, f"logits_{i}.npy"), model(tokens).logits[0].float().numpy())
      new = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=spec["new_tokens"],
                           do_sample=False)[0, len(ids):].tolist()
    generated.append({"prompt": ids, "new": new})
  return generated


def _ids(value):
  """apply_chat_template's ids, whether it returns a list or a BatchEncoding."""
  return list(value["input_ids"] if hasattr(value, "keys") else value)


def _float32_model(transformers, torch, directory: str, name: str):
  """The GGUF's model as a plain float32 LlamaForCausalLM (eager attention: plain softmax(QK^T)V)."""
  loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  config = loaded.config
  config._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(config)
  model.load_state_dict(loaded.state_dict())
  model.generation_config = loaded.generation_config
  return model.eval()


if __name__ == "__main__":
  main(sys.argv[1])
