"""Samples text from a run's checkpoint with a KV cache.

  python scripts/sample.py --config=configs/default.py --workdir=runs/default --prompt="def main(" --max_tokens=64

Greedy by default (--temperature=0); --temperature, --top_k, --top_p and --seed for sampling, --num_samples
continuations of the prompt at once, --step for a checkpoint other than the latest. Past model.max_seq_len
the context slides: each further token sees the last max_seq_len tokens (said in the output). A LoRA run's
checkpoint is read onto its base (config.train.init_from). Uses the run's
tokenizer (the one its config names, cached under config.data.data_dir) for the prompt and the output.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from lm import config_file, console
from lm.config import from_config_dict
from lm.errors import ConfigError, TrainingError

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints are read, never written).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (empty: start a new document).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "New tokens at most; stops earlier at end-of-sequence.",
                                   lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose probability reaches p.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt, decoded together.",
                                    lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
flags.mark_flags_as_required(["config", "workdir"])


def check_prompt(prompt: str) -> None:
  """ConfigError when --prompt holds bytes that are not UTF-8 (Python keeps them as surrogate escapes)."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    raw = prompt[e.start:e.end].encode("utf-8", errors="surrogateescape")
    raise ConfigError(f"--prompt holds bytes that are not UTF-8 ({raw!r} at character {e.start}): the shell passed "
                      "text in another encoding, or binary data. Pass the prompt as UTF-8 text (a UTF-8 locale "
                      "and terminal, or convert it: iconv -t UTF-8).") from None


def main(argv):
  console.start_command(argv)
  import jax  # after absl has parsed the flags (XLA_FLAGS may be set by the caller)
  import numpy as np

  from lm import corpus, evaluate, sampling
  from lm.model import Decoder

  try:
    config = from_config_dict(_CONFIG.value)
    check_prompt(_PROMPT.value)
    sampler = sampling.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    tokenizer = corpus.load_tokenizer(config.data, config.model.vocab_size)
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []  # as documents are framed in training
    prompt = [*head, *tokenizer.encode(_PROMPT.value)]
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else -1  # -1: no end, max_tokens each
    step, params, mesh = evaluate.params_for_inference(config, _WORKDIR.value, step=_STEP.value)
    prompt_BxP = np.tile(np.asarray(prompt, np.int32), (_NUM_SAMPLES.value, 1))
    num_ids = tokenizer.vocab_size if tokenizer.vocab_size < config.model.vocab_size else 0
    # The mesh without the logical rules: the activation constraints would split the batch (a few samples)
    # over the data-parallel devices; the parameters keep the shardings they were restored into.
    with jax.set_mesh(mesh):
      new_BxT, slid = sampling.generate_sliding(
          params, prompt_BxP, jax.random.key(_SEED.value), model=Decoder(config.model),
          max_new_tokens=_MAX_TOKENS.value, sampling=sampler, eos_id=eos_id, num_ids=num_ids)
    console.logger.info("Checkpoint step %d, %s", step, sampler)
    if slid or len(prompt) > config.model.max_seq_len:
      console.logger.info("Context slid: the prompt (%d tokens) and the new ones pass config.model.max_seq_len = "
                          "%d, so %d new token(s) were drawn from the last %d tokens only (the earlier ones "
                          "dropped, as nanoGPT's sampler crops).", len(prompt), config.model.max_seq_len, slid,
                          config.model.max_seq_len)
    for row in np.asarray(new_BxT):
      ids = row.tolist()
      ids = ids[:ids.index(eos_id)] if eos_id in ids else ids
      print(tokenizer.decode(prompt[len(head):] + ids))
  except (ConfigError, ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
