"""The corpus of a config: its tokenizer, its sources prepared into token stores (once, on first use),
and the train and eval rows cut from them.

Each source's prepared tokens live in `<data_dir>/prepared/<name>-<settings key>-<tokenizer>`: changed
settings or another tokenizer are prepared beside the old ones and never mixed with them. The key is the
source's settings, not its files (their listing is recorded in the manifest when prepared), so a prepared
source opens without its raw files, and files changed afterwards are not noticed. A trained tokenizer is
cached likewise under `<data_dir>/tokenizers`. Every path may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from absl import logging
from etils import epath

from lm import storage
from lm.checkpoints import lease
from lm.config import DataConfig, SourceConfig
from lm.data import batching, chat, prepare as preparation, sources, token_store, tokenizer as tokenizers
from lm.data.tokenizer import Tokenizer
from lm.errors import ConfigError


DEFAULT_DATA_DIR = "~/.cache/lm"


def data_dir(cfg: DataConfig) -> epath.Path:
  """config.data.data_dir as a path; ConfigError when a local one is (or lies under) a file."""
  if storage.is_remote(cfg.data_dir):
    return epath.Path(cfg.data_dir)
  path = os.path.abspath(os.path.expanduser(cfg.data_dir or DEFAULT_DATA_DIR))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = f"config.data.data_dir = {cfg.data_dir!r}" if cfg.data_dir else (
        f"config.data.data_dir (empty: {DEFAULT_DATA_DIR})")
    what = "a file" if existing == path else f"under {existing}, which is a file"
    raise ConfigError(f"{where} is {what}, not a directory. It holds the trained tokenizers and the prepared "
                      f"token shards: name a directory (created when missing), or leave it empty for "
                      f"{DEFAULT_DATA_DIR}.")
  return epath.Path(path)


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
  """The configured tokenizer (trained on a sample of the corpus on first use when no path is given),
  checked against the model's vocabulary size."""
  if cfg.tokenizer == "byte":
    tokenizer = tokenizers.ByteTokenizer()
  elif cfg.tokenizer_path:
    tokenizer = tokenizers.read(cfg.tokenizer, os.path.expanduser(cfg.tokenizer_path))
  else:
    tokenizer = _trained_tokenizer(cfg, vocab_size)
  return tokenizers.check(tokenizer, cfg, vocab_size)


def load_chat(cfg: DataConfig, tokenizer: Tokenizer) -> chat.Chat:
  """The chat template and stop ids of the model files beside the configured tokenizer (an import's
  directory, or a Hugging Face model's); none for the byte tokenizer or one the run trained."""
  path = os.path.expanduser(cfg.tokenizer_path) if cfg.tokenizer != "byte" and cfg.tokenizer_path else ""
  directory = None if not path else (path if epath.Path(path).is_dir() else os.fspath(epath.Path(path).parent))
  return chat.read(directory, tokenizer.eos_id, tokenizer.token_id)


def _trained_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
  learned_from = [sources.settings(src) for src in cfg.sources if src.weight > 0]
  path = data_dir(cfg) / "tokenizers" / (
      f"spm_{vocab_size}_{_key(learned_from, cfg.tokenizer_sample_bytes, vocab_size, 'bpe-v2')}.model")
  if not path.exists():
    for src in cfg.sources:
      sources.check(src)
    logging.info("Training a SentencePiece model of %d pieces on the first %s bytes of the corpus",
                 vocab_size, f"{cfg.tokenizer_sample_bytes:,}")
    model = tokenizers.train_sentencepiece(_sample(cfg), vocab_size)
    try:
      tokenizers.SentencePieceTokenizer(model, os.fspath(path))  # written only once it reads back
    except RuntimeError as e:
      raise ConfigError(f"SentencePiece training gave no usable model ({e}); raise "
                        "config.data.tokenizer_sample_bytes or add text.") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    token_store.write_atomic(path, model)
  return _cached(path)


def _cached(path: epath.Path) -> Tokenizer:
  """The tokenizer trained and cached by an earlier run; ConfigError naming the file when it is damaged
  (no key of the config names it: config.data.tokenizer_path is empty)."""
  try:
    return tokenizers.SentencePieceTokenizer(path.read_bytes(), os.fspath(path))
  except (OSError, RuntimeError) as e:  # unreadable; SentencePiece's parse failure
    reason = (str(e).splitlines() or [""])[0][:200]
    raise ConfigError(f"The SentencePiece tokenizer cached in {path} by an earlier run (trained on this corpus; "
                      f"config.data.tokenizer_path is empty) is damaged ({type(e).__name__}: {reason}). Delete "
                      "that file: the next run trains it again from the corpus.") from e


def _sample(cfg: DataConfig):
  """The first train documents of each source (held-out ones skipped), up to its weight's share of
  config.data.tokenizer_sample_bytes; ConfigError when a source holds out every document."""
  total = sum(src.weight for src in cfg.sources)
  for src in cfg.sources:
    budget = cfg.tokenizer_sample_bytes * src.weight / total
    fraction = 0.0 if src.validation else src.validation_fraction
    kept = held = 0
    for chunk in sources.chunks(src, "train"):
      for key, text in sources.documents(chunk):
        if text and fraction and sources.held_out(key, fraction):
          held += 1
        elif text:
          kept += 1
          yield text
          budget -= len(text.encode("utf-8", errors="replace"))
        if budget <= 0:
          break
      if budget <= 0:
        break
    if src.weight > 0 and held and not kept:
      raise ConfigError(empty_train_part(src, held))


def empty_train_part(src: SourceConfig, documents: int) -> str:
  """The message for a source whose every document (`documents` of them) is held out for validation."""
  return (f"{sources.key(src)}: its train part is empty: all {documents:,} of its {documents:,} documents are held "
          f"out for validation by validation_fraction = {src.validation_fraction:g} (a document goes to validation "
          f"when a hash of its text falls below it). Lower {sources.key(src)}.validation_fraction, add "
          "documents, or name validation files.")


# ---------------------------------------------------------------------------------------------------
# Prepared sources


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One source's prepared token stores."""
  source: SourceConfig
  directory: str
  manifest: dict
  stores: dict[str, token_store.TokenStore]  # "train", "validation"

  def describe(self) -> str:
    s, train, val = self.source, self.stores["train"], self.stores["validation"]
    held = (f"validation files {s.validation}" if s.validation
            else f"{s.validation_fraction:g} of the documents held out by a hash of their text")
    return (f"{s.kind} {s.path or '(the Python standard library)'}: train {train.num_tokens:,} tokens in "
            f"{train.num_documents:,} documents; {held}: {val.num_tokens:,} tokens in {val.num_documents:,} "
            f"documents ({self.directory})")


def prepared_directory(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer) -> epath.Path:
  """`<data_dir>/prepared/<name>-<settings key>-<tokenizer fingerprint>`; a chat source's settings key
  holds its chat template's fingerprint (another template makes other tokens)."""
  return data_dir(cfg) / "prepared" / f"{_prefix(src, _chat_of(cfg, src, tokenizer))}{tokenizer.fingerprint}"


def _chat_of(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer) -> chat.Chat | None:
  """The chat a source is tokenized with: the model's for a chat source, none for the others."""
  return load_chat(cfg, tokenizer) if src.kind == "chat" else None


def _prefix(src: SourceConfig, chat_of: chat.Chat | None = None) -> str:
  settings = sources.settings(src)
  if chat_of is not None:
    settings["chat"] = chat_of.fingerprint
  return f"{src.name}-{_key(token_store.FORMAT, settings)}-"


def _complete(directory: epath.Path) -> dict | None:
  manifest = token_store.read_manifest(os.fspath(directory))
  return manifest if manifest is not None and manifest.get("complete") else None


def _check_new(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer) -> None:
  """main.py prepares a source on first use, but not beside a preparation of it with another tokenizer:
  that is a forgotten tokenizer flag far more often than a wish to tokenize the corpus again."""
  directory = prepared_directory(cfg, src, tokenizer)
  prefix = directory.name.removesuffix(tokenizer.fingerprint)
  others = [p.name for p in directory.parent.glob(prefix + "*") if _complete(p)] \
      if directory.parent.exists() else []
  if others:
    raise ConfigError(f"{sources.key(src)} is prepared in {directory.parent} with another tokenizer "
                      f"({', '.join(sorted(others))}), not with {tokenizer.describe()} that the config asks for. "
                      "Set config.data.tokenizer and tokenizer_path to the one it was prepared with, or run "
                      "scripts/prepare_data.py with this config to prepare it with this one too (kept beside).")


def _open(src: SourceConfig, directory: epath.Path, manifest: dict) -> Prepared:
  stores = {part: token_store.TokenStore(os.fspath(directory), part, manifest) for part in token_store.PARTS}
  for store in stores.values():
    store.check_files()
  return Prepared(src, os.fspath(directory), manifest, stores)


def prepare_all(cfg: DataConfig, vocab_size: int, *, new_tokenizer: bool = False,
                repair: bool = False) -> tuple[Tokenizer, dict[str, Prepared]]:
  """The tokenizer and every source's stores, the sources not (or partly) prepared prepared first. A
  prepared source is only opened: its raw files need not be there.

  Args:
    new_tokenizer: prepare a source even beside a preparation of it with another tokenizer
      (scripts/prepare_data.py); main.py stops there instead (`_check_new`).
    repair: first check every shard file of the prepared sources (CRC-32) and prepare again from the
      first damaged one on.
  """
  tokenizer = load_tokenizer(cfg, vocab_size)
  directories = {src.name: prepared_directory(cfg, src, tokenizer) for src in cfg.sources}
  if repair:
    repair_all(cfg, tokenizer)
  manifests = {name: _complete(directory) for name, directory in directories.items()}
  todo = [src for src in cfg.sources if manifests[src.name] is None]
  for src in todo:  # every source checked before any is tokenized
    if not new_tokenizer and token_store.read_manifest(os.fspath(directories[src.name])) is None:
      _check_new(cfg, src, tokenizer)
    sources.check(src)
  for src in todo:
    manifests[src.name] = _prepare_alone(cfg, src, tokenizer, directories[src.name])
  prepared = {src.name: _open(src, directories[src.name], manifests[src.name]) for src in cfg.sources}
  for p in prepared.values():
    held = p.stores["validation"].num_documents
    if p.source.weight > 0 and not p.source.validation and held and not p.stores["train"].num_documents:
      raise ConfigError(empty_train_part(p.source, held))
  return tokenizer, prepared


WAIT_SECONDS = 5.0  # between looks at a preparation that another process is writing
# After writing the lease, before reading it back: a preparation that started at the same moment writes its
# own within this time (a local write takes microseconds, one to gs:// a fraction of a second).
SETTLE_SECONDS = {"local": 0.1, "remote": 1.0}


def _prepare_alone(cfg: DataConfig, src: SourceConfig, tokenizer: Tokenizer, directory: epath.Path) -> dict:
  """Prepares the source as the one writer of its directory (a lease, lm/checkpoints/lease.py: two preparations of it
  would race on its shard files). One by another live process is waited for, and its result used."""
  directory.mkdir(parents=True, exist_ok=True)
  said = False
  while (claim := _claim(directory)) is None:
    holder = lease.Lease(os.fspath(directory)).holder() or {}
    if not said:
      logging.warning("%s is being prepared into %s by host %s, pid %s (started %s): waiting for it to finish, "
                      "then using what it prepared.", sources.key(src), directory, holder.get("host"),
                      holder.get("pid"), holder.get("started"))
      said = True
    time.sleep(WAIT_SECONDS)
    if (manifest := _complete(directory)) is not None:
      return manifest
  try:
    if (manifest := _complete(directory)) is None:  # unless finished by the one waited for
      logging.info("Preparing %s with %s into %s", sources.key(src), tokenizer.describe(), directory)
      manifest = preparation.prepare(src, tokenizer, os.fspath(directory), identity=sources.identity(src),
                                     workers=cfg.workers, shard_tokens=cfg.shard_tokens,
                                     chat=_chat_of(cfg, src, tokenizer))
    return manifest
  finally:
    claim.__exit__(None, None, None)


def _claim(directory: epath.Path) -> lease.Lease | None:
  """The lease of the directory, taken (its heartbeat running); None while another live process holds it."""
  claim = lease.Lease(os.fspath(directory))
  if claim.holder() is not None:
    return None
  claim.__enter__()  # writes it
  time.sleep(SETTLE_SECONDS["remote" if storage.is_remote(directory) else "local"])
  if claim.holder() is not None:  # a preparation that started at the same moment wrote after this one
    return None
  claim.confirm()
  return claim


def repair_all(cfg: DataConfig, tokenizer: Tokenizer) -> None:
  """Checks every shard file of the prepared sources (CRC-32); from the first damaged shard of a source on,
  its shards leave the manifest, to be prepared again by `prepare_all`."""
  for src in cfg.sources:
    for path in preparation.repair(os.fspath(prepared_directory(cfg, src, tokenizer))):
      logging.warning("Damaged: %s; preparing again from its shard on", path)


# ---------------------------------------------------------------------------------------------------
# Rows


def _sequences(prepared: Prepared, part: str, seq_len: int) -> batching.Sequences:
  """Rows cut across documents; a chat source's: whole conversations packed into rows."""
  if prepared.stores[part].masked:
    return batching.ConversationSequences(prepared.stores[part], seq_len)
  return batching.StoredSequences(prepared.stores[part], seq_len)


def train_batches(prepared: dict[str, Prepared], seq_len: int, seed: int,
                  global_batch_size: int) -> batching.TrainBatches:
  weights = {name: p.source.weight for name, p in prepared.items()}
  for p in prepared.values():
    tokens = p.stores["train"].num_tokens
    if p.source.weight > 0 and tokens < seq_len and not p.stores["train"].masked:  # a conversation fills a row
      raise ConfigError(f"config.train.seq_len = {seq_len:,} is longer than the train part of "
                        f"{sources.key(p.source)} ({tokens:,} tokens): not one sequence of it can be cut. Lower "
                        "train.seq_len, or add text.")
  return batching.TrainBatches({name: _sequences(p, "train", seq_len) for name, p in prepared.items()}, seed,
                           global_batch_size, weights)


def eval_batches(cfg: DataConfig, prepared: dict[str, Prepared], seq_len: int,
                 batch_size: int) -> batching.EvalBatches:
  """The eval rows (config.data.eval_split): every source's validation rows, or a sample of
  config.data.eval_sequences of them; of the train rows, a sample as large as the validation rows unless
  eval_sequences says otherwise (the whole train split would be an epoch at every eval)."""
  count = cfg.eval_sequences
  if cfg.eval_split == "train" and count == 0:
    count = sum(len(_sequences(p, "validation", seq_len)) for p in prepared.values())
  batches = batching.EvalBatches([_sequences(p, cfg.eval_split, seq_len) for p in prepared.values()], count,
                             batch_size)
  if batches.num_sequences == 0:
    tokens = sum(p.stores[cfg.eval_split].num_tokens for p in prepared.values())
    raise ConfigError(f"config.data.eval_split = {cfg.eval_split!r}: its {tokens:,} tokens make no sequence of "
                      f"config.train.seq_len = {seq_len}. Raise the sources' validation_fraction, name "
                      "validation files, or lower train.seq_len.")
  return batches


def describe_eval(cfg: DataConfig, batches: batching.EvalBatches) -> str:
  what = "held-out validation" if cfg.eval_split == "validation" else "train"
  return (f"the {what} rows: {batches.describe()} of the sources (config.data.eval_sequences = "
          f"{cfg.eval_sequences}), {len(batches)} batches of {batches.batch_size}")
