"""The one loop (`train`) and what runs in it: the set-up every command shares (`runtime`), the step
program (`train_step`, `optimizer`), the kinds of training (`next_token`: pre-training and SFT; `grpo`), eval,
the figures (`flop_count`, `metrics`) and the profiler."""
