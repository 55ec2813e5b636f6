"""LLaMA 1.36B: d_model 2048, 24 layers, 16 heads of 128, SwiGLU 5632, vocab 32000, untied embeddings,
pretrained on FineWeb-Edu (Parquet files with a `text` column, as Hugging Face publishes them).

  python scripts/prepare_data.py --config=configs/llama_1_36b.py \\
      '--config.data.sources.main.path=gs://BUCKET/fineweb-edu/data/*/*.parquet' --config.data.data_dir=gs://BUCKET/prepared
  python main.py --config=configs/llama_1_36b.py --workdir=gs://BUCKET/llama_1_36b \\
      '--config.data.sources.main.path=gs://BUCKET/fineweb-edu/data/*/*.parquet' --config.data.data_dir=gs://BUCKET/prepared

Prepare once on any CPU machine (resumable), then train; main.py would prepare on first use too, while the
other hosts wait. On 8 devices a step is 8 x 64 x 8 = 4,096 sequences = 8,388,608 tokens; 20,000 steps are
168 billion tokens. Too large to train on a CPU; the tests build its shapes with jax.eval_shape.
"""

from configs import base


def get_config():
  c = base.get_config()  # the base model shapes, seq_len 2048 and micro batch 8 are this model's
  # The corpus: give its files on the command line (local or gs://).
  c.data.sources.main = base.source(kind="parquet", path="gs://BUCKET/fineweb-edu/data/*/*.parquet")
  # 0.1% of the documents (~170M tokens) held out; eval scores all of them, a forward pass worth about 7
  # train steps every 1,000 (config.data.eval_sequences for a sample).
  c.data.sources.main.validation_fraction = 0.001
  c.data.tokenizer_sample_bytes = 1_000_000_000  # the 32,000-piece SentencePiece model learns from 1 GB
  c.model.dtype = "bfloat16"  # compute in bf16, keep float32 parameters and optimizer state
  # Without remat the activations of 8 x 2048 tokens take ~6 GB per layer; saving only the matmul
  # outputs brings that to ~1 GB.
  c.model.remat = "save_dots"
  # Parameters, Adam moments and the accumulator are ~22 GB in float32: shard them over every device.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  # Across TPU slices (or GPU hosts) shard over theirs too: the whole state is 22 GB. (The hosts of one
  # TPU slice share its interconnect: a slice is one granule, its chips all on the fsdp axis.)
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = -1
  c.train.gradient_accumulation_steps = 64  # 4,096 sequences per step on 8 devices
  c.train.num_train_steps = 20000
  c.train.warmup_steps = 2000
  c.train.save_interval_steps = 1000
  c.train.eval_interval_steps = 1000
  return c
