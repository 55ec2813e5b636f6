"""LLaMA 1.36B: d_model 2048, 24 layers, 16 heads of 128, SwiGLU 5632, vocab 32000, untied embeddings.

  python main.py --config=configs/llama_1_36b.py --workdir=gs://BUCKET/llama_1_36b

On 8 devices a step is 8 x 64 x 8 = 4,096 sequences = 8,388,608 tokens. Too large to train on a CPU;
the tests build its shapes with jax.eval_shape.
"""

from configs import base


def get_config():
  c = base.get_config()  # the base model shapes, seq_len 2048 and micro batch 8 are this model's
  c.model.dtype = "bfloat16"  # compute in bf16, keep float32 parameters and optimizer state
  # Without remat the activations of 8 x 2048 tokens take ~6 GB per layer; saving only the matmul
  # outputs brings that to ~1 GB.
  c.model.remat = "save_dots"
  # Parameters, Adam moments and the accumulator are ~22 GB in float32: shard them over every device.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.dcn_data = 1  # on several hosts (a pod slice), shard over theirs too: the whole state is 22 GB
  c.mesh.dcn_fsdp = -1
  c.train.gradient_accumulation_steps = 64  # 4,096 sequences per step on 8 devices
  c.train.num_train_steps = 20000
  c.train.warmup_steps = 2000
  c.train.save_interval_steps = 1000
  c.train.eval_interval_steps = 1000
  return c
