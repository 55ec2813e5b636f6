"""GRPO on an imported instruct model (configs/imported.py's DIR): LoRA adapters trained on grade-school word
problems, each prompt the user's message in the model's chat template, rewarded when the last number of the
completion is the answer (lm/training/rewards.py: word_problems, last_number; no reward for the format alone).

  python scripts/convert_hf.py import --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=ckpt/smollm2
  python main.py --config=configs/imported_grpo.py:ckpt/smollm2 --workdir=runs/smollm2_grpo

Each optimizer step: micro_batch_size 8 x accumulation 4 x the data-parallel devices completions, 8 per
prompt (on one device: 4 prompts x 8 generations) sampled at temperature 0.7, at most 256 tokens each: room
to reason before the answer (SmolLM2-135M-Instruct writes 90 tokens on average and a third of its answers run
past 128). Learning rate, temperature, beta and epsilon are those scripts/benchmark_grpo_trl.py compares with
TRL's GRPOTrainer; the reference of the KL penalty is the imported model (LoRA's base). The eval is greedy on
200 held-out problems, which no training prompt ever is.
"""

from configs import imported


def get_config(import_dir: str = ""):
  c = imported.get_config(import_dir)
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  c.grpo.enabled = True
  c.grpo.chat = True
  c.grpo.task = "lm.training.rewards.word_problems"
  c.grpo.rewards = "lm.training.rewards.last_number"
  c.grpo.num_generations = 8
  c.grpo.temperature = 0.7
  c.grpo.beta = 0.04
  c.grpo.epsilon = 0.2
  c.grpo.max_completion_tokens = 256
  c.grpo.eval_prompts = 200
  c.train.seq_len = 320  # the chat-framed prompt (at most 64 tokens) + the completion
  c.train.micro_batch_size = 8
  c.train.gradient_accumulation_steps = 4
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 0
  c.train.schedule = "constant"
  c.train.weight_decay = 0.0
  c.train.num_train_steps = 200
  c.train.save_interval_steps = 25
  c.train.eval_interval_steps = 50
  c.train.log_interval_steps = 1
  return c
