"""Qwen3 with the shapes of the public Qwen3-1.7B: d_model 2048, 28 layers, 16 query heads and 8 key/value
heads of 128, per-head query/key RMSNorm, SwiGLU 6144, vocab 151936, tied embeddings, RoPE base 1e6.

  python main.py --config=configs/qwen3_1_8b.py --workdir=gs://BUCKET/qwen3_1_8b

On 8 devices a step is 6 x 16 x 8 = 768 sequences = 1,572,864 tokens. Continued training from the public
weights: convert them (the import copies Qwen's tokenizer, a byte-level BPE tokenizer.json, and its
tokenizer_config.json beside them), then name the result in train.init_from and its tokenizer in
data.tokenizer_path, so that the text is tokenized the way the weights expect:

  python scripts/convert_hf.py import --hf_dir=Qwen3-1.7B --out=ckpt/qwen3_1_8b --config=configs/qwen3_1_8b.py
  python main.py --config=configs/qwen3_1_8b.py --workdir=runs/qwen3_ft --config.train.init_from=ckpt/qwen3_1_8b \\
      --config.data.tokenizer=huggingface --config.data.tokenizer_path=ckpt/qwen3_1_8b/tokenizer.json

Qwen3's documents have no beginning-of-sequence token; each ends with tokenizer_config.json's eos_token
(<|endoftext|> in Qwen3-1.7B-Base's, <|im_end|> in the chat model Qwen3-1.7B's). `scripts/convert_hf.py
export` of the run writes the tokenizer beside the exported weights.

1,720,574,976 parameters (tests/test_model.py). Too large to train on a CPU; the tests build its shapes
with jax.eval_shape.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "qwen3"
  c.model.vocab_size = 151936
  c.model.d_model = 2048
  c.model.num_layers = 28
  c.model.num_heads = 16
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 6144
  c.model.max_seq_len = 40960  # the public model's max_position_embeddings
  c.model.rope_theta = 1_000_000.0
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = True
  c.model.qk_norm = True
  c.model.dtype = "bfloat16"  # compute in bf16, keep float32 parameters and optimizer state
  c.model.remat = "save_dots"  # 6 x 2048 tokens per micro-step: keep only the matmul outputs
  # Parameters, Adam moments and the accumulator are ~28 GB in float32: shard them over every device.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.dcn_data = 1  # across TPU slices or GPU hosts too (as configs/llama_1_36b.py)
  c.mesh.dcn_fsdp = -1
  c.train.seq_len = 2048
  # The float32 logits of 6 x 2048 tokens over 151,936 entries are 7.5 GB per device, their gradient as
  # much again: the vocabulary, not the layers, sets the micro batch.
  c.train.micro_batch_size = 6
  c.train.gradient_accumulation_steps = 16  # 768 sequences per step on 8 devices
  return base.continued_training(c)
