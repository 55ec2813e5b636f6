"""A small LLaMA (~5M parameters) trained on the Python standard library's sources, on a laptop CPU.

  python main.py --config=configs/default.py --workdir=runs/default

Offline: the corpus is the running Python's own stdlib (2% of its files held out for validation), the
SentencePiece tokenizer is trained on it and the tokens prepared on the first run, both kept under
~/.cache/lm (config.data.data_dir). A few minutes on 2 CPU cores.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 4096  # a small vocabulary: the embeddings would otherwise dwarf the layers
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2  # exercise grouped-query attention
  c.model.head_dim = 64
  c.model.mlp_dim = 768
  c.model.max_seq_len = 256
  c.model.scan_layers = False  # 4 layers: unrolled compiles in seconds and runs faster (docs/performance.md)
  c.train.seq_len = 256
  c.train.micro_batch_size = 8
  c.train.gradient_accumulation_steps = 2  # exercise accumulation: 16 sequences per step on one device
  c.train.num_train_steps = 100
  c.train.learning_rate = 3e-3  # small models take a large rate
  c.train.warmup_steps = 10
  c.train.save_interval_steps = 50
  c.train.eval_interval_steps = 50
  c.train.log_interval_steps = 10
  return c
