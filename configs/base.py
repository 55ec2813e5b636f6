"""Every configuration key, declared once with its default.

Model files start from `get_config()` and change only what differs. Nothing here is meant to be run on
its own: `configs/default.py` is the small run, `configs/llama_1_36b.py` the full-size one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "llama"  # model family: llama | qwen3 | gemma3 (the Hugging Face architecture on export)
  c.model.vocab_size = 32000
  c.model.d_model = 2048
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.num_kv_heads = 16  # < num_heads for grouped-query attention
  c.model.head_dim = 128
  c.model.mlp_dim = 5632
  c.model.max_seq_len = 4096  # longest train.seq_len this model accepts
  c.model.rope_theta = 10000.0  # RoPE base of the global layers (all layers without a sliding window)
  c.model.rope_scaling_factor = 1.0  # linear RoPE scaling of the global layers: positions / factor
  c.model.sliding_window = 0  # keys a local layer sees, itself included; 0 = no local layers
  c.model.local_layers_per_global = 0  # local layers before each global one (Gemma3: 5); 0 = none
  c.model.rope_local_theta = 10000.0  # RoPE base of the local layers
  c.model.qk_norm = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma3)
  c.model.post_norms = False  # RMSNorm of the attention and MLP outputs before the residual add (Gemma3)
  c.model.norm_unit_offset = False  # RMSNorm multiplies by 1 + scale, scale starting at 0 (Gemma)
  c.model.mlp_activation = "silu"  # gate activation: silu (SwiGLU) | gelu_tanh (GeGLU)
  c.model.embed_scale = False  # multiply the embeddings by sqrt(d_model) (Gemma)
  c.model.query_scale_dim = 0  # attention logits are q.k / sqrt(query_scale_dim); 0 = head_dim
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = False
  c.model.init_std = 0.02
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.model.param_dtype = "float32"  # storage dtype of parameters and optimizer state
  c.model.remat = "none"  # none | full | save_dots (keep weight matmul outputs, recompute the rest)
  c.model.scan_layers = True  # one compiled layer body instead of num_layers copies
  # Attention kernel: auto (splash on TPU, cudnn on GPU in bfloat16, else xla) | xla | splash (TPU flash
  # attention) | cudnn (GPU flash attention). See lm/model/attention.py.
  c.model.attention = "auto"
  # The loss (training's, eval's, GRPO's) computes the float32 logits of this many positions at a time,
  # recomputed in the backward pass: never [batch, seq_len, vocab] at once (1 GB per sequence of 8,192 at a
  # 32k vocabulary). 0, or a seq_len at most this: all at once. Sampling always computes them whole.
  c.model.logits_chunk = 2048
  # LoRA (lm/model/lora.py): adapters of this rank on the projections named in lora_targets, the rest frozen;
  # 0 = train every parameter. The adapters' output is scaled by lora_alpha / lora_rank.
  c.model.lora_rank = 0
  c.model.lora_alpha = 16.0
  c.model.lora_targets = "q,k,v,o,gate,up,down"  # among q, k, v, o (attention), gate, up, down (MLP)

  c.data = ml_collections.ConfigDict()
  # Named document sources; several make a mixture (each row of a step drawn by weight). See source().
  c.data.sources = ml_collections.ConfigDict({"main": source()})
  # Where prepared tokens (and trained tokenizers) live: local or gs://. Empty = ~/.cache/lm.
  c.data.data_dir = ""
  c.data.tokenizer = "sentencepiece"  # sentencepiece | huggingface (a tokenizer.json) | byte
  c.data.tokenizer_path = ""  # .model or tokenizer.json; empty (sentencepiece) = train one on the corpus
  c.data.tokenizer_sample_bytes = 100_000_000  # text a trained tokenizer learns from (the first documents)
  c.data.eval_split = "validation"  # validation | train (the loss on training rows)
  c.data.eval_sequences = 0  # sequences of train.seq_len scored by eval; 0 = the whole split, else a sample
  c.data.workers = 0  # tokenizing processes of the preparation; 0 = one per CPU core
  c.data.shard_tokens = 134_217_728  # train tokens per prepared shard (256 MiB at 2 bytes a token)

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.seq_len = 2048
  c.train.micro_batch_size = 8  # sequences per device per forward/backward pass
  c.train.gradient_accumulation_steps = 1  # micro-batches each device accumulates per optimizer step
  c.train.num_train_steps = 1000  # optimizer steps; 0 = derive from num_epochs
  c.train.num_epochs = 0  # passes over the train split, used when num_train_steps is 0
  c.train.optimizer = "adamw"  # adamw | lion
  c.train.learning_rate = 3e-4  # peak, reached after warmup
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"  # cosine | linear | constant (after warmup)
  c.train.final_learning_rate_ratio = 0.1  # end of the decay, as a fraction of the peak
  c.train.weight_decay = 0.1  # decoupled; never applied to norms or biases
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8  # adamw only
  c.train.max_grad_norm = 1.0  # clip by global norm; 0 = no clipping
  c.train.checkpoint_dir = ""  # empty = <workdir>/checkpoints
  c.train.init_from = ""  # parameters to start from (scripts/convert_hf.py import, or a run's checkpoints)
  c.train.save_interval_steps = 500
  c.train.max_to_keep = 3
  c.train.eval_interval_steps = 500
  c.train.log_interval_steps = 10
  c.train.wandb_project = ""  # also log to this Weights & Biases project; empty = TensorBoard only
  c.train.peak_flops_per_device = 0.0  # for MFU; 0 = from the device kind (CPU: measured once)
  c.train.deterministic = True  # reproducible kernels where the platform needs a switch (GPU)
  c.train.skip_nonfinite_updates = False  # False: stop at a NaN/Inf; True: skip such updates, count them
  # Data-parallel replicas (mesh.data > 1) sum their micro-batches' gradients, then one all-reduce per
  # optimizer step; False: XLA all-reduces every micro-batch's gradient (another order of additions).
  c.train.local_accumulation = True
  # Bit-identical training however the global batch is split (micro_batch_size x accumulation x data-parallel
  # devices): each group of batch_invariant_rows consecutive rows gets its own gradient, added in global row
  # order on every mesh (docs/gradient_accumulation.md). Off: faster, and equal across splits only to
  # float32 rounding. Needs mesh.fsdp = mesh.tensor = 1.
  c.train.batch_invariant = False
  # Rows per gradient group, the same in the runs compared: a common divisor of their micro_batch_size.
  # 1 fits every split; more rows make larger matmuls and fewer gradient exchanges (faster).
  c.train.batch_invariant_rows = 1
  # jax.profiler trace of optimizer steps START:END, numbered as in the log (from 1), END exclusive as
  # in a Python slice: "10:13" traces steps 10, 11 and 12 into <workdir>/profile on every process, for
  # TensorBoard's profile plugin (XProf) or Perfetto. Empty = no profile.
  c.train.profile_steps = ""
  # Resuming a checkpoint whose run had another seed, seq_len, data source or tokenizer is refused (its
  # steps from there on would train on other tokens); True does it on purpose, with a warning.
  c.train.allow_data_change = False

  # Device mesh. One axis may be -1: all remaining devices. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Several processes (one per host): how many hosts each axis spans, over the data-centre network (DCN);
  # the rest of the axis stays within a host. One may be -1: all remaining hosts. The product is the number
  # of processes. Default: data parallel across hosts, fsdp and tensor within each (MaxText's ICI/DCN split).
  c.mesh.dcn_data = -1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1

  # GRPO (lm/training/grpo.py): reinforcement learning from a verifiable reward instead of next-token training. Each
  # optimizer step samples num_generations completions of each of its prompts (global batch sequences /
  # num_generations prompts), rewards them, normalises the rewards within each prompt's group, and takes
  # the clipped policy-gradient step with a KL penalty to the reference (the starting) model.
  c.grpo = ml_collections.ConfigDict()
  c.grpo.enabled = False
  c.grpo.num_generations = 4  # completions per prompt (>= 2)
  c.grpo.num_iterations = 1  # optimizer steps on each batch of completions (TRL's num_iterations, mu)
  c.grpo.beta = 0.04  # weight of the KL penalty to the reference model
  # The KL term times the probability ratio (1 in value on-policy), so that its gradient is the reverse KL's own,
  # unbiased (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default). False: the k3 estimate's gradient alone.
  c.grpo.kl_bias_correction = True
  c.grpo.epsilon = 0.2  # clip of the probability ratio
  c.grpo.max_completion_tokens = 16  # new tokens per completion at most (prompt + them <= train.seq_len); a real
  # instruct model reasons first and needs far more (configs/imported_grpo.py: 256)
  c.grpo.temperature = 1.0  # sampling temperature of the completions
  c.grpo.task = "lm.training.rewards.arithmetic"  # prompts and answers: module.function(seed, split, indices, cfg)
  c.grpo.max_operand = 99  # the arithmetic task's operands: 0 to max_operand
  c.grpo.dataset = ""  # lm.training.rewards.jsonl_problems' file: JSON Lines of {"prompt": ..., "answer": ...}
  c.grpo.rewards = "lm.training.rewards.exact_answer,lm.training.rewards.answer_format"  # summed; module.function each
  c.grpo.eval_prompts = 64  # held-out prompts scored (greedy) at every eval
  c.grpo.chat = False  # each prompt as the user's message, rendered with the model's chat template (instruct models)
  c.grpo.system_prompt = ""  # with grpo.chat: a system message before each prompt (empty: none)

  return c


def source(kind: str = "text_files", path: str = "", **changes) -> ml_collections.ConfigDict:
  """A document source of config.data.sources, every key declared with its default."""
  s = ml_collections.ConfigDict()
  # text_files (one document per file) | jsonl | parquet (a record per document) | text (large files cut
  # into documents) | tfds (a registered TFDS dataset)
  s.kind = kind
  # Comma-separated globs, local or gs:// (tfds: the dataset name). text_files with an empty path: the
  # running Python's standard library sources.
  s.path = path
  s.text_field = "text"  # jsonl field, parquet column, tfds feature holding the text
  # Validation documents: comma-separated globs (tfds: a split name). Empty: hold out validation_fraction
  # of the documents, chosen by a hash of their text.
  s.validation = ""
  s.validation_fraction = 0.02
  s.separator = ""  # text: the string between documents; empty = one or more blank lines
  s.train_split = "train"  # tfds only
  s.weight = 1.0  # share of the training rows in a mixture (weights are normalised)
  s.max_documents = 0  # cap on the documents read per part; 0 = all
  unknown = sorted(set(changes) - set(s.keys()))
  if unknown:
    raise KeyError(f"base.source: unknown keys {unknown}; the keys are {sorted(s.keys())}.")
  s.update(changes)
  return s


def continued_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Run settings for continued training or fine-tuning of imported weights (the Qwen3 and Gemma3
  configs): a small learning rate, 10,000 steps, a checkpoint and an eval every 1,000."""
  c.train.learning_rate = 1e-4
  c.train.num_train_steps = 10000
  c.train.warmup_steps = 500
  c.train.save_interval_steps = 1000
  c.train.eval_interval_steps = 1000
  return c
