"""Gemma3 with the shapes of the public gemma-3-270m: d_model 640, 18 layers, 4 query heads and 1 key/value
head of 256, GeGLU 2048, vocab 262144, sliding window 512; the rest as configs/gemma3_1b.py.

  python main.py --config=configs/gemma3_270m.py --workdir=runs/gemma3_270m

On 8 devices a step is 2 x 32 x 8 = 512 sequences = 1,048,576 tokens. 268,098,176 parameters, 168M of them
the embedding (tests/test_model.py).
"""

from configs import base
from configs.gemma3_1b import gemma3


def get_config():
  c = gemma3(base.get_config())
  c.model.d_model = 640
  c.model.num_layers = 18
  c.model.num_heads = 4
  c.model.num_kv_heads = 1
  c.model.mlp_dim = 2048
  c.model.sliding_window = 512
  return c
