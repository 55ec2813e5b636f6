"""Gemma3 with the shapes of the language model of the public gemma-3-4b: d_model 2560, 34 layers, 8 query
heads and 4 key/value heads of 256, GeGLU 10240, vocab 262208, sliding window 1024, linear RoPE scaling 8
on the global layers; the rest as configs/gemma3_1b.py. Text only: the SigLIP vision tower of the public
checkpoint is not part of this model (scripts/convert_hf.py imports the language model of it).

  python main.py --config=configs/gemma3_4b.py --workdir=gs://BUCKET/gemma3_4b

On 8 devices a step is 2 x 32 x 8 = 512 sequences = 1,048,576 tokens. 3,880,263,168 parameters
(tests/test_model.py).
"""

from configs import base
from configs.gemma3_1b import gemma3


def get_config():
  c = gemma3(base.get_config())
  c.model.vocab_size = 262208  # the 4B's embedding has 64 rows more than the tokenizer: image tokens
  c.model.d_model = 2560
  c.model.num_layers = 34
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.mlp_dim = 10240
  c.model.sliding_window = 1024
  c.model.rope_scaling_factor = 8.0  # global layers: 128K context from 32K pretraining
  c.model.max_seq_len = 131072
  c.model.remat = "save_dots"
  return c
