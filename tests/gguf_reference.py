"""Reference logits and token ids from transformers loading GGUF files, run under .venv-hf by tests/test_gguf.py.

  .venv-hf/bin/python tests/gguf_reference.py SPEC.json

SPEC: {"out": dir, "models": [...], "tokenizers": [...]}; each model is
  {"name", "dir", "file", "tokens": [[int]]}: AutoModelForCausalLM.from_pretrained(dir, gguf_file=file) in
      float32 with eager attention; writes out/<name>.<k>.npy, the logits of each token sequence k;
each tokenizer is
  {"name", "dir", "file" (absent: the Hugging Face files of dir), "texts": [str], "save": dir (optional)}:
      AutoTokenizer.from_pretrained; writes out/<name>.json ({"plain": ids of each text without special
      tokens, "special": with them}) and saves the tokenizer to `save` with save_pretrained.
Writes out/report.json (each model's config as transformers read it, versions). One process for all.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers


def logits(entry: dict, out: str) -> dict:
  model = transformers.AutoModelForCausalLM.from_pretrained(
      entry["dir"], gguf_file=entry["file"], dtype=torch.float32, attn_implementation="eager")
  model.eval()
  with torch.no_grad():
    for k, tokens in enumerate(entry["tokens"]):
      result = model(input_ids=torch.tensor([tokens], dtype=torch.long)).logits[0]
      np.save(os.path.join(out, f"{entry['name']}.{k}.npy"), result.float().numpy())
  config = model.config
  keys = ("head_dim", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
          "max_position_embeddings")
  return {k: getattr(config, k, None) for k in keys}


def token_ids(entry: dict, out: str) -> None:
  kwargs = {"gguf_file": entry["file"]} if entry.get("file") else {}
  tok = transformers.AutoTokenizer.from_pretrained(entry["dir"], **kwargs)
  ids = {"plain": [tok(t, add_special_tokens=False)["input_ids"] for t in entry["texts"]],
         "special": [tok(t, add_special_tokens=True)["input_ids"] for t in entry["texts"]]}
  with open(os.path.join(out, f"{entry['name']}.json"), "w") as f:
    json.dump(ids, f)
  if entry.get("save"):
    tok.save_pretrained(entry["save"])


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  torch.manual_seed(0)
  report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
  for entry in spec.get("tokenizers", []):
    token_ids(entry, spec["out"])
  for entry in spec.get("models", []):
    report[entry["name"]] = logits(entry, spec["out"])
  with open(os.path.join(spec["out"], "report.json"), "w") as f:
    json.dump(report, f, indent=2)


if __name__ == "__main__":
  main(sys.argv[1])
