"""A model imported by scripts/convert_hf.py (its --out directory), ready to use: its model, its tokenizer and
chat template, its weights as config.train.init_from, and the run settings of continued training.

  python scripts/sample.py --config=configs/imported.py:ckpt/smollm2 --chat --prompt="What is 7 plus 5?"
  python main.py --config=configs/imported.py:ckpt/smollm2 --workdir=runs/smollm2 --mode=eval
  python main.py --config=configs/imported.py:ckpt/smollm2 --workdir=runs/smollm2_lora --config.model.lora_rank=8

The model section is the import's model.json; the tokenizer its tokenizer.json (else its SentencePiece
tokenizer.model). Training data and every other key are configs/base.py's, overridable as usual
(--config.data.sources.main.path=...); train.seq_len is base's, or the model's max_seq_len when shorter.
"""

import json
import os

from configs import base


def get_config(import_dir: str = ""):
  if not import_dir:
    raise ValueError("name the import's directory after a colon: --config=configs/imported.py:DIR (the --out of "
                     "scripts/convert_hf.py import)")
  model_file = os.path.join(os.path.expanduser(import_dir), "model.json")
  if not os.path.isfile(model_file):
    raise ValueError(f"{import_dir} holds no model.json: name the --out directory of scripts/convert_hf.py import")
  with open(model_file) as f:
    model = json.load(f)["model"]
  c = base.get_config()
  unknown = sorted(set(model) - set(c.model.keys()))
  if unknown:
    raise ValueError(f"{model_file} has keys this project does not know: {unknown}")
  for key, value in model.items():
    c.model[key] = tuple(value) if isinstance(value, list) else value
  for kind, name in (("huggingface", "tokenizer.json"), ("sentencepiece", "tokenizer.model")):
    if os.path.isfile(os.path.join(import_dir, name)):
      c.data.tokenizer, c.data.tokenizer_path = kind, os.path.join(import_dir, name)
      break
  else:
    raise ValueError(f"{import_dir} has no tokenizer (tokenizer.json or tokenizer.model): import a model "
                     "directory that has one, or write your own config naming it")
  c.train.init_from = import_dir
  c.train.seq_len = min(c.train.seq_len, c.model.max_seq_len)
  return base.continued_training(c)
