"""Tokenizers: UTF-8 bytes, SentencePiece models and Hugging Face `tokenizer.json` files, behind one protocol.

Each tokenizer frames its input as it defines it (`encode_batch(framed=True)`, `encode_input`): a Hugging
Face tokenizer with the special tokens its tokenizer.json post-processor adds (LLaMA 3's <|begin_of_text|>;
none for Qwen3 or SmolLM2), exactly the ids of transformers' `tokenizer(text)`; SentencePiece and byte
tokenizers with their beginning-of-sequence id. A document is its framed input followed by the
end-of-document separator, the tokenizer's end-of-sequence id (`frame`). Nothing depends on a padding id: padding is masked by segment
id 0 (`lm.data.batching.loss_mask`), whatever its token.

Every tokenizer pickles to the bytes it was read from, so that worker processes of the preparation
(`lm.data.prepare`) rebuild the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Protocol

from etils import epath
import numpy as np
import sentencepiece as spm

from lm.config import DataConfig
from lm.errors import ConfigError


# End-of-text tokens of common Hugging Face tokenizers, for a tokenizer.json without tokenizer_config.json.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer(Protocol):
  vocab_size: int  # ids are in [0, vocab_size)
  eos_id: int | None  # the end-of-document separator (None: documents are not separated)
  fingerprint: str  # changes whenever the id mapping or the framing changes; part of the data's key

  def encode(self, text: str) -> list[int]: ...  # the text alone: no special id added
  def encode_batch(self, texts: list[str], framed: bool = False) -> list[list[int]]: ...  # framed: as inputs
  def encode_special(self, text: str) -> list[int]: ...  # special tokens written in the text are their ids
  def token_id(self, token: str) -> int | None: ...  # a special token's id (None: the tokenizer lacks it)
  def decode(self, ids, special: bool = False) -> str: ...  # special: special tokens written, not dropped
  def describe(self) -> str: ...


def encode_input(tokenizer: Tokenizer, text: str) -> list[int]:
  """The text framed as the tokenizer frames an input (a prompt): transformers' `tokenizer(text)`."""
  return tokenizer.encode_batch([text], framed=True)[0]


def frame(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
  """The documents' ids: each framed as the tokenizer frames an input, then its end-of-document separator
  (unless the framing already ends with it)."""
  tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  return [ids + tail if not tail or ids[-1:] != tail else ids
          for ids in tokenizer.encode_batch(texts, framed=True)]


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer type that holds every id."""
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _written_out(ids, names: dict[int, str], decode) -> str:
  """The text of `ids` with each special id written as its name, the runs between them decoded."""
  out, run = [], []
  for i in map(int, ids):
    if i in names:
      out += [decode(run), names[i]]
      run = []
    else:
      run.append(i)
  return "".join(out + [decode(run)])


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: 0 unused (padding), bos 1, eos 2, byte b -> b + 3. An input
  starts with bos."""

  vocab_size, bos_id, eos_id = 259, 1, 2
  fingerprint = "byte"
  _OFFSET = 3

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._OFFSET).tolist()

  def encode_batch(self, texts: list[str], framed: bool = False) -> list[list[int]]:
    return [[self.bos_id] * framed + self.encode(text) for text in texts]

  def encode_special(self, text: str) -> list[int]:
    return self.encode(text)

  def token_id(self, token: str) -> int | None:
    return None

  def decode(self, ids, special: bool = False) -> str:
    if special:
      return _written_out(ids, {0: "<pad>", self.bos_id: "<s>", self.eos_id: "</s>"}, self.decode)
    data = bytes(int(i) - self._OFFSET for i in ids if self._OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def describe(self) -> str:
    return "byte 259"


class SentencePieceTokenizer:
  """A SentencePiece model with whatever special ids it has (-1 = none)."""

  def __init__(self, model_proto: bytes, path: str):
    self._proto, self._path = model_proto, path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    if self.vocab_size == 0:  # an empty proto loads without an error
      raise RuntimeError("no pieces")
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self._special = {i for i in (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) if i >= 0}
    self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:16]

  def __reduce__(self):
    return SentencePieceTokenizer, (self._proto, self._path)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str], framed: bool = False) -> list[list[int]]:
    # One thread: the preparation's worker processes are the parallelism (threads on top oversubscribe).
    head = [self.bos_id] if framed and self.bos_id is not None else []
    return [head + ids for ids in self._sp.encode(list(texts), num_threads=1)]

  def encode_special(self, text: str) -> list[int]:
    """SentencePiece matches its user-defined pieces (Gemma's <start_of_turn>) in text by itself, not its
    control pieces (<bos>, <eos>): those are split out here."""
    if not hasattr(self, "_controls"):
      self._controls = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
    pattern = "|".join(re.escape(p) for p in sorted(self._controls, key=len, reverse=True) if p)
    ids = []
    for k, part in enumerate(re.split(f"({pattern})", text) if pattern else [text]):
      ids += [self._controls[part]] if k % 2 else (self._sp.encode(part) if part else [])
    return ids

  def token_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return i if self._sp.id_to_piece(i) == token else None

  def decode(self, ids, special: bool = False) -> str:
    if special:
      return _written_out(ids, {i: self._sp.id_to_piece(i) for i in self._special}, self._sp.decode)
    return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

  def describe(self) -> str:
    return f"sentencepiece {self.vocab_size} ({self._path})"


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` library. An input gets the special tokens of
  its post-processor, as transformers' `tokenizer(text)` gives them (transformers 5 follows the
  post-processor, not tokenizer_config.json's add_bos_token). Its end-of-document separator is the
  eos_token that `tokenizer_config.json` beside it names (what TRL's packing appends); without that file,
  the first known end-of-text token it has."""

  def __init__(self, tokenizer_json: str, path: str, eos: str | None):
    from tokenizers import Tokenizer as HFTokenizer  # here: only runs with such a tokenizer need it

    self._json, self._path, self._eos = tokenizer_json, path, eos
    self._tok = HFTokenizer.from_str(tokenizer_json)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = None if eos is None else self._tok.token_to_id(eos)
    framing = f"post-processor; separator {eos!r}"
    self.fingerprint = "hf-" + hashlib.sha256((tokenizer_json + framing).encode()).hexdigest()[:16]

  def __reduce__(self):
    return HuggingFaceTokenizer, (self._json, self._path, self._eos)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str], framed: bool = False) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=framed)]

  def encode_special(self, text: str) -> list[int]:
    return self.encode(text)  # its added tokens are matched in the text

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def decode(self, ids, special: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=not special)

  def describe(self) -> str:
    added = self._tok.encode("", add_special_tokens=True).tokens
    return (f"huggingface {self.vocab_size} ({self._path}; input framing {' '.join(added) or 'none'}, "
            f"separator {self._eos or 'none'})")


# ---------------------------------------------------------------------------------------------------
# Reading a configured tokenizer


def read(kind: str, path: str) -> Tokenizer:
  """The tokenizer of `kind` stored at `path` (a file, or for huggingface a directory holding
  tokenizer.json); ConfigError naming config.data.tokenizer_path when it cannot be read."""
  if kind == "byte":
    return ByteTokenizer()
  what = f"config.data.tokenizer_path = {path!r}"
  file = epath.Path(path)
  if kind == "huggingface" and file.is_dir():
    file = file / "tokenizer.json"
  try:
    content = file.read_bytes()
  except OSError as e:
    raise ConfigError(f"{what} cannot be read ({e}); point it at a "
                      + ("tokenizer.json (or its directory)" if kind == "huggingface"
                         else "SentencePiece .model file") + ".") from e
  if kind == "sentencepiece":
    try:
      return SentencePieceTokenizer(content, path)
    except RuntimeError as e:  # SentencePiece's parse failure
      raise ConfigError(f"{what} is not a SentencePiece model ({e}). For a Hugging Face tokenizer.json "
                        "set config.data.tokenizer=huggingface.") from e
  try:
    eos = _hf_separator(content.decode("utf-8"), file.parent / "tokenizer_config.json")
    return HuggingFaceTokenizer(content.decode("utf-8"), os.fspath(file), eos)
  except (UnicodeDecodeError, ValueError, Exception) as e:  # tokenizers raises a plain Exception
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{what} is not a Hugging Face tokenizer.json ({str(e)[:200]}). For a SentencePiece "
                      "model set config.data.tokenizer=sentencepiece.") from e


def _hf_separator(tokenizer_json: str, config_file: epath.Path) -> str | None:
  """The end-of-document token: tokenizer_config.json's eos_token when the tokenizer has it; without that
  file, the first known end-of-text token among its added tokens."""
  added = {t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
  if config_file.exists():
    eos = json.loads(config_file.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if eos in added else None
  return next((t for t in _EOS_CANDIDATES if t in added), None)


def check(tokenizer: Tokenizer, cfg: DataConfig, vocab_size: int) -> Tokenizer:
  """The tokenizer, once its ids are known to fit the model's embedding."""
  # Fewer ids than rows is allowed: imported models may have rows no text token uses (Gemma3 4B's image
  # tokens, Qwen3's padding to a multiple of 128).
  if tokenizer.vocab_size > vocab_size:
    source = f"config.data.tokenizer_path = {cfg.tokenizer_path!r}" if cfg.tokenizer_path else (
        f"config.data.tokenizer = {cfg.tokenizer!r}")
    raise ConfigError(f"{source} has {tokenizer.vocab_size} ids but config.model.vocab_size = {vocab_size}; "
                      f"raise model.vocab_size to at least {tokenizer.vocab_size}, or use the tokenizer "
                      "the model was trained with.")
  bos_id = getattr(tokenizer, "bos_id", None)
  if bos_id is not None and bos_id == tokenizer.eos_id:
    raise ConfigError(f"config.data.tokenizer_path = {cfg.tokenizer_path!r} uses id {bos_id} for "
                      "both the beginning and the end of a document; give it distinct ids.")
  return tokenizer


# ---------------------------------------------------------------------------------------------------
# Training a SentencePiece model


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
  """A BPE SentencePiece model of `vocab_size` pieces learned from `texts` (a bounded sample), as bytes.

  Ids: pad 0, unk 1, bos 2, eos 3. Raises ConfigError when vocab_size does not suit the text: too few
  pieces for its characters, or more than it has."""
  import io

  sampled = [0]  # bytes of text given, for the message

  def lines():
    for text in texts:
      sampled[0] += len(text.encode("utf-8", errors="replace"))
      yield from (line for line in text.splitlines() if line)

  model = io.BytesIO()
  # The sentence sample is random: a fixed seed gives every host and every rerun the same tokenizer.
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True, split_digits=True,
        # Keep every space exactly as written so Python indentation round-trips. The corpus is fed line by
        # line, so a dummy prefix would teach pieces that never occur mid-document.
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=1 << 16,  # longer lines are skipped (the default 4,192 bytes drops minified code)
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ConfigError(_training_failure(str(e), vocab_size, sampled[0])) from e
  return model.getvalue()


def _training_failure(error: str, vocab_size: int, sampled: int) -> str:
  """What SentencePiece's refusal means for config.model.vocab_size (its own text names its own flags)."""
  where = f"config.model.vocab_size = {vocab_size}"
  sample = f"the {sampled:,} bytes of text sampled from the corpus"
  too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", error)
  if too_high:
    return (f"{where}: SentencePiece can learn at most {int(too_high[2]):,} pieces from {sample}, too "
            f"little text for {vocab_size:,} pieces: lower config.model.vocab_size to {too_high[2]} or less, or add text "
            "(or raise config.data.tokenizer_sample_bytes when the corpus holds more than the sample).")
  too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", error)
  if too_low:
    return (f"{where} is too small for {sample}: a SentencePiece model of it needs at least "
            f"{int(too_low[2]):,} pieces (the 4 special ids, 256 byte pieces and each distinct character of "
            f"the text). Raise config.model.vocab_size to at least {too_low[2]}.")
  return f"{where}: SentencePiece training on {sample} failed ({(error.splitlines() or [''])[0][:300]})."
