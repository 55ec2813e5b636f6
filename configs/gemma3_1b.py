"""Gemma3 with the shapes of the public gemma-3-1b: d_model 1152, 26 layers, 4 query heads and 1 key/value
head of 256, GeGLU 6912, vocab 262144, tied embeddings scaled by sqrt(d_model), query/key norms, pre- and
post-norms, 5 sliding-window layers (512 keys, RoPE base 1e4) before each global one (RoPE base 1e6).

  python main.py --config=configs/gemma3_1b.py --workdir=gs://BUCKET/gemma3_1b

On 8 devices a step is 2 x 32 x 8 = 512 sequences = 1,048,576 tokens. The Gemma tokenizer is a
SentencePiece model (config.data.tokenizer = "sentencepiece", the default): the import copies it
(tokenizer.model, with the checkpoint's other tokenizer files) beside the weights; fine-tune the public
weights with it as

  python scripts/convert_hf.py import --hf_dir=gemma-3-1b-pt --out=ckpt/gemma3_1b --config=configs/gemma3_1b.py
  python main.py --config=configs/gemma3_1b.py --workdir=runs/gemma3_ft --config.train.init_from=ckpt/gemma3_1b \\
      --config.data.tokenizer_path=ckpt/gemma3_1b/tokenizer.model

999,885,952 parameters (tests/test_model.py).
"""

from configs import base


def gemma3(c):
  """What every Gemma3 size shares: the switches of the architecture, and run settings for its vocabulary."""
  c.model.name = "gemma3"
  c.model.vocab_size = 262144
  c.model.head_dim = 256  # independent of d_model / num_heads
  c.model.query_scale_dim = 256  # the public query_pre_attn_scalar of the 270M, 1B and 4B
  c.model.rope_theta = 1_000_000.0  # global layers
  c.model.rope_local_theta = 10_000.0  # sliding-window layers
  c.model.local_layers_per_global = 5
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = True
  c.model.qk_norm = True
  c.model.post_norms = True
  c.model.norm_unit_offset = True
  c.model.mlp_activation = "gelu_tanh"
  c.model.embed_scale = True
  c.model.max_seq_len = 32768  # the public max_position_embeddings of the 270M and 1B
  c.model.dtype = "bfloat16"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.dcn_data = 1  # across TPU slices or GPU hosts too (as configs/llama_1_36b.py)
  c.mesh.dcn_fsdp = -1
  c.train.seq_len = 2048
  # The float32 logits of 2 x 2048 tokens over 262,144 entries are 4.3 GB per device, and their
  # gradient as much again: the vocabulary, not the layers, sets the micro batch.
  c.train.micro_batch_size = 2
  c.train.gradient_accumulation_steps = 32  # 512 sequences per step on 8 devices
  return base.continued_training(c)


def get_config():
  c = gemma3(base.get_config())
  c.model.d_model = 1152
  c.model.num_layers = 26
  c.model.num_heads = 4
  c.model.num_kv_heads = 1
  c.model.mlp_dim = 6912
  c.model.sliding_window = 512
  return c
