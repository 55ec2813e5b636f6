"""Text to token rows: document sources, tokenizers and chat templates, the preparation into token stores
(once, streaming, resumable), and the rows and batches of every step (a function of the seed and the step)."""
