"""Reference logits from transformers (PyTorch, CPU), run under .venv-hf by tests/test_convert_hf.py.

  .venv-hf/bin/python tests/hf_reference.py SPEC.json

SPEC: {"tokens": [[int]], "out": dir, "models": [...]}; each model is either
  {"name", "build": {"architecture", "config": {config.json keys}, "seed"}, "save": dir}: a random model
      built from the config (no download), its parameters drawn anew so that no norm weight is its
      initial 1 or 0, saved with save_pretrained(safe_serialization=True) to `save`;
  {"name", "load": dir}: a checkpoint loaded with from_pretrained.
Writes out/<name>.npy (float32 logits of the tokens) and out/report.json ({name: loading info}, versions).
Everything in one process: importing torch and transformers takes most of the time.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers


def randomise(model: torch.nn.Module, seed: int) -> None:
  """Weights of unit-scale activations (1/sqrt(fan_in) matrices, unit embeddings) so that attention is
  far from uniform, and norm weights moved off their initial values so that a mix-up of norms shows."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "norm" in name:
        p.add_(0.2 * noise)
      elif p.ndim == 2 and "embed" not in name:
        p.copy_(noise / p.shape[1] ** 0.5)
      else:
        p.copy_(noise)


def build(spec: dict) -> torch.nn.Module:
  config_class = getattr(transformers, spec["architecture"]).config_class
  config = config_class(**spec["config"], attn_implementation="eager")  # plain softmax(QK^T)V
  model = getattr(transformers, spec["architecture"])(config)
  randomise(model, spec["seed"])
  return model


def main(path: str) -> None:
  with open(path) as f:
    spec = json.load(f)
  torch.manual_seed(0)
  tokens = torch.tensor(spec["tokens"], dtype=torch.long)
  report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
  for entry in spec["models"]:
    if "build" in entry:
      model = build(entry["build"])
      model.save_pretrained(entry["save"], safe_serialization=True)
      info = {}
    else:
      model, info = transformers.AutoModelForCausalLM.from_pretrained(
          entry["load"], dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
      info = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
    assert model.config._attn_implementation == "eager"
    model.eval()
    with torch.no_grad():
      logits = model(input_ids=tokens).logits
    np.save(os.path.join(spec["out"], f"{entry['name']}.npy"), logits.float().numpy())
    report[entry["name"]] = info
  with open(os.path.join(spec["out"], "report.json"), "w") as f:
    json.dump(report, f, indent=2)


if __name__ == "__main__":
  main(sys.argv[1])
