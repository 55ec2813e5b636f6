"""Samples text from a run's checkpoint, or from an import, with a KV cache.

  python scripts/sample.py --config=configs/default.py --workdir=runs/default --prompt="def main(" --max_tokens=64
  python scripts/sample.py --config=configs/imported.py:ckpt/smollm2 --chat --prompt="What is 7 plus 5?"

Greedy by default (--temperature=0); --temperature, --top_k, --top_p and --seed for sampling, --num_samples
continuations of the prompt at once, --step for a checkpoint other than the latest. Without --workdir, the
parameters are those of the import config.train.init_from (or --init_from) names: a converted model is
sampled at once, no run needed. Past model.max_seq_len the context slides: each further token sees the last
max_seq_len tokens (said in the output). A LoRA run's checkpoint is read onto its base
(config.train.init_from).

The prompt (--prompt, or --prompt_file) is framed as the tokenizer frames an input: the ids of
transformers' `tokenizer(prompt)`. With --chat it is the user's message of a conversation (after --system's
message) rendered with the model's chat template, ending with the assistant's header: the ids of
`apply_chat_template(messages, add_generation_prompt=True)`, and the reply alone is printed. A model without
a template (the byte tokenizer, a tokenizer the run trained) gets lm/data/chat.py's plain one ("role: content"
lines, then "assistant: "), the one its chat sources were fine-tuned on, and stops at the end of document. Generation
stops at any end id of the model's generation_config.json or its tokenizer's end of document;
--show_special writes the special tokens instead of dropping them.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from lm import config_file, console
from lm.config import from_config_dict
from lm.data import chat as lm_chat, tokenizer as tokenizers
from lm.errors import ConfigError, TrainingError

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints are read, never written). "
                               "Without it: the import that --init_from or config.train.init_from names.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "An import's directory (scripts/convert_hf.py import --out); "
                                 "replaces config.train.init_from.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue, or with --chat the user's message (empty: start a "
                              "new document).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A UTF-8 file whose text is the prompt (instead of --prompt).")
_CHAT = flags.DEFINE_boolean("chat", False, "The prompt is a user message, rendered with the model's chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "With --chat: a system message before the user's.")
_SHOW_SPECIAL = flags.DEFINE_boolean("show_special", False, "Write special tokens (<|im_end|>, ...) in the output.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "New tokens at most; stops earlier at an end id.",
                                   lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose probability reaches p.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt, decoded together.",
                                    lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
flags.mark_flags_as_required(["config"])


def prompt_text() -> str:
  """--prompt, or the text of --prompt_file (not both)."""
  if _PROMPT_FILE.value is None:
    return _PROMPT.value
  if _PROMPT.value:
    raise ConfigError("Give the prompt as --prompt or as --prompt_file, not both.")
  try:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"--prompt_file={_PROMPT_FILE.value} cannot be read as UTF-8 text ({e}).") from e


def prompt_ids(tokenizer, chat) -> list[int]:
  """The prompt's ids: the chat template's rendering of it (--chat), else framed as an input. An empty
  prompt of a tokenizer that adds nothing starts after its end of document: a new document."""
  text = prompt_text()
  if _CHAT.value:
    return tokenizer.encode_special(chat.render(lm_chat.messages(text, _SYSTEM.value)))
  if _SYSTEM.value is not None:
    raise ConfigError("--system is a message of a conversation: add --chat.")
  ids = tokenizers.encode_input(tokenizer, text)
  if not ids and tokenizer.eos_id is None:
    raise ConfigError("The prompt is empty and the tokenizer frames it with nothing: give a --prompt.")
  return ids or [tokenizer.eos_id]


def check_prompt(prompt: str, flag: str = "--prompt") -> None:
  """ConfigError when a text flag holds bytes that are not UTF-8 (Python keeps them as surrogate escapes)."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    raw = prompt[e.start:e.end].encode("utf-8", errors="surrogateescape")
    raise ConfigError(f"{flag} holds bytes that are not UTF-8 ({raw!r} at character {e.start}): the shell passed "
                      "text in another encoding, or binary data. Pass the prompt as UTF-8 text (a UTF-8 locale "
                      "and terminal, or convert it: iconv -t UTF-8).") from None


def main(argv):
  console.start_command(argv)
  import dataclasses

  import jax  # after absl has parsed the flags (XLA_FLAGS may be set by the caller)
  import numpy as np

  from lm.data import corpus
  from lm.model import sampling
  from lm.model.decoder import Decoder
  from lm.training import evaluate

  try:
    config = from_config_dict(_CONFIG.value)
    if _INIT_FROM.value is not None:
      config = dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=_INIT_FROM.value))
    check_prompt(_PROMPT.value)
    check_prompt(_SYSTEM.value or "", "--system")
    sampler = sampling.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    tokenizer = corpus.load_tokenizer(config.data, config.model.vocab_size)
    chat = corpus.load_chat(config.data, tokenizer)
    prompt = prompt_ids(tokenizer, chat)
    step, params, mesh = evaluate.params_for_inference(config, _WORKDIR.value, step=_STEP.value)
    prompt_BxP = np.tile(np.asarray(prompt, np.int32), (_NUM_SAMPLES.value, 1))
    num_ids = tokenizer.vocab_size if tokenizer.vocab_size < config.model.vocab_size else 0
    # The mesh without the logical rules: the activation constraints would split the batch (a few samples)
    # over the data-parallel devices; the parameters keep the shardings they were restored into.
    started = time.perf_counter()
    with jax.set_mesh(mesh):
      new_BxT, slid = sampling.generate_sliding(
          params, prompt_BxP, jax.random.key(_SEED.value), model=Decoder(config.model),
          max_new_tokens=_MAX_TOKENS.value, sampling=sampler, stop_ids=chat.stop_ids, num_ids=num_ids)
    seconds = time.perf_counter() - started
    console.logger.info("%s %d, %s; %d prompt tokens, %d new in %.2f s (compilation included)",
                        "Checkpoint step" if _WORKDIR.value else f"Import {config.train.init_from}, step", step,
                        sampler, len(prompt), new_BxT.shape[1], seconds)
    if slid or len(prompt) > config.model.max_seq_len:
      console.logger.info("Context slid: the prompt (%d tokens) and the new ones pass config.model.max_seq_len = "
                          "%d, so %d new token(s) were drawn from the last %d tokens only (the earlier ones "
                          "dropped, as nanoGPT's sampler crops).", len(prompt), config.model.max_seq_len, slid,
                          config.model.max_seq_len)
    for row in np.asarray(new_BxT).tolist():
      end = next((i for i, token in enumerate(row) if token in chat.stop_ids), len(row))
      ids = row[:end + 1] if _SHOW_SPECIAL.value else row[:end]
      shown = ids if _CHAT.value and not _SHOW_SPECIAL.value else prompt + ids
      print(tokenizer.decode(shown, special=_SHOW_SPECIAL.value))
  except (ConfigError, ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
