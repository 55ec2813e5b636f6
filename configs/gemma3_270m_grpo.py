"""GRPO on gemma3_270m: LoRA adapters trained to add two numbers, rewarded by the exact answer (lm/training/rewards.py).

  python scripts/convert_hf.py import --hf_dir=gemma-3-270m --out=ckpt/gemma3_270m
  python main.py --config=configs/gemma3_270m_grpo.py --workdir=runs/gemma3_270m_grpo \
      --config.train.init_from=ckpt/gemma3_270m \
      --config.data.tokenizer=sentencepiece --config.data.tokenizer_path=ckpt/gemma3_270m/tokenizer.model

Each optimizer step: micro_batch_size 8 x accumulation 4 x the data-parallel devices completions, 4 per
prompt (on one device: 8 prompts x 4 generations), at most 8 tokens each. The reference of the KL penalty is
the imported model (LoRA's base). Without init_from the base is a random initialisation: only the mechanics
can be tried then. Not yet run on an imported gemma-3-270m by this project's tests.
"""

from configs import gemma3_270m


def get_config():
  c = gemma3_270m.get_config()
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.grpo.enabled = True
  c.grpo.num_generations = 4
  c.grpo.beta = 0.04
  c.grpo.epsilon = 0.2
  c.grpo.max_completion_tokens = 8
  c.grpo.temperature = 1.0
  c.grpo.max_operand = 99
  c.grpo.eval_prompts = 64
  c.train.seq_len = 32
  c.train.micro_batch_size = 8
  c.train.gradient_accumulation_steps = 4
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 10
  c.train.schedule = "constant"
  c.train.num_train_steps = 500
  c.train.weight_decay = 0.0
  c.train.save_interval_steps = 50
  c.train.eval_interval_steps = 50
  c.train.log_interval_steps = 5
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return c
