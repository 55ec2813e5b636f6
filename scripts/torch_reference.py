"""The PyTorch reference of the benchmark: transformers' LLaMA with the shapes of configs/bench_60m.py,
trained with AdamW under `torch.compile`, on the same kind of synthetic batch. Runs in the side venv that
scripts/install.sh makes for the transformers tests (Python 3.11, the CPU build of torch):

  .venv-hf/bin/python scripts/torch_reference.py --steps=8 --warmup=2

Prints one JSON line: median step time, tokens/s, and the same for eager PyTorch, to set beside the
output of scripts/benchmark.py (run one after the other on an otherwise idle machine).
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# configs/bench_60m.py
SHAPES = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
              intermediate_size=1536, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=256,
              rms_norm_eps=1e-6, rope_theta=10000.0)
SEQ_LEN, SEQUENCES = 256, 8


def step_times(model, steps: int, warmup: int) -> list[float]:
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=False)
  generator = torch.Generator().manual_seed(0)
  tokens = torch.randint(3, SHAPES["vocab_size"], (SEQUENCES, SEQ_LEN), generator=generator)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
  args = parser.parse_args()
  torch.manual_seed(0)
  result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens_per_step": SEQUENCES * SEQ_LEN}
  for name, compile_model in (("eager", False), ("compiled", True)):
    model = LlamaForCausalLM(LlamaConfig(**SHAPES, attn_implementation="sdpa")).float().train()
    if compile_model:
      model = torch.compile(model)
    times = step_times(model, args.steps, args.warmup)
    median = statistics.median(times)
    result[name] = {"step_time_median": median, "step_time_min": min(times),
                    "tokens_per_sec": SEQUENCES * SEQ_LEN / median}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
