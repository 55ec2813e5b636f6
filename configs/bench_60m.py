"""LLaMA 60M for the throughput benchmark: d_model 512, 8 layers, 8 heads of 64, SwiGLU 1536, vocab 32000.

  python scripts/benchmark.py --config=configs/bench_60m.py

2,048 tokens per step (8 sequences of 256) on synthetic tokens; see docs/performance.md. It also trains
like any config: python main.py --config=configs/bench_60m.py --workdir=runs/bench_60m
"""

from configs import base


def get_config():
  c = base.get_config()  # vocab 32000, untied embeddings, AdamW with clipping at 1.0 are the base's
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 1536
  c.model.max_seq_len = 256
  c.model.scan_layers = False  # 8 layers: unrolled is faster and compiles quickly (docs/performance.md)
  c.train.seq_len = 256
  # micro_batch_size 8 is the base's: on one device a step is 8 sequences = 2,048 tokens.
  return c
