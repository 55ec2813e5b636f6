"""Document sources: where the text of a corpus comes from, read as a stream in a fixed order.

A source (`config.data.sources.<name>`) is one of
  text_files  files of text, one document per file (empty path: the running Python's standard library)
  jsonl       JSON Lines files (.jsonl, .jsonl.gz, .jsonl.zst), one document per line in `text_field`
  chat        JSON Lines files as jsonl's, one conversation per line (supervised fine-tuning): either
              {"messages": [{"role", "content"}, ...]} (Hugging Face chat datasets) or {"prompt", "completion"}
              (two strings: a user and an assistant message; or two lists of messages, TRL's conversational
              prompt-completion, whose completion alone is learned); tokenized with the model's chat
              template by `lm.data.chat.Chat.tokenize` when prepared, the assistant's tokens marked as learned
  parquet     Parquet files, one document per row in the column `text_field`
  text        large text files cut into documents by `separator` (empty: one or more blank lines)
  tfds        a registered TFDS dataset, read split by split (`path` is its name, `text_field` its feature)
Paths are comma-separated globs, local or on a remote file system etils.epath knows (gs://...).

Each source has two parts: `train`, and `validation` when `validation` names files (or a TFDS split).
Without it, the validation documents are a `validation_fraction` of the train part's documents, chosen by
a hash of their text (`held_out`; a chat source's: of its line): deterministic, independent of order and
of the other documents.

The main process only reads bytes: a source yields chunks (a few hundred documents' worth of raw input),
and `decode(chunk)` turns one into texts in a worker process (JSON parsing, file reads, decoding). Input
must be UTF-8 text: a file that is binary or in another encoding is refused, naming it; a few stray bytes
are decoded as U+FFFD and counted (MAX_INVALID_BYTES).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import socket
import sysconfig
import threading
import urllib.parse
from typing import Iterator

from etils import epath

from lm.config import SourceConfig
from lm.errors import ConfigError
from lm.storage import is_remote


CHUNK_DOCUMENTS = 512  # documents (parquet rows, text pieces) per chunk
CHUNK_BYTES = 1 << 20  # bytes of jsonl lines per chunk
CHUNK_FILES = 32  # files per chunk of text_files
_BLOCK_BYTES = 4 << 20  # read size of the text kind
# A file is refused as not text when it holds a NUL byte (binary files do, text never does) or when more
# than MAX_INVALID_BYTES of its bytes, and more than MAX_INVALID_FRACTION of them, are not UTF-8 (another
# encoding, or binary data). Fewer are decoded as U+FFFD and counted in the log: a few stray bytes cost a
# few characters (the Python standard library, the default corpus, has three test files in other encodings).
MAX_INVALID_BYTES = 100
MAX_INVALID_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Raw input of a few hundred documents, in the order of the source. `kind` says how to decode it."""
  kind: str
  payload: object  # text_files: paths; jsonl: (path, whole lines as bytes); others: texts
  field: str = ""
  where: str = ""  # for error messages: the config key of the source
  line: int = 1  # jsonl and chat: the line of its file where the payload starts, for error messages
  invalid: dict = dataclasses.field(default_factory=dict)  # texts: {path: bytes not UTF-8} of files read


def held_out(text: str, fraction: float) -> bool:
  """Whether a document belongs to the validation part: a hash of its text below `fraction`. Duplicates
  land on the same side, so a repeated document never sits in both."""
  digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64 < fraction


def key(src: SourceConfig) -> str:
  return f"config.data.sources.{src.name}"


@contextlib.contextmanager
def _reading(where: str, path: str):
  """A file that cannot be read or decoded (permissions, a truncated .gz, a corrupt Parquet file) as a
  ConfigError naming the source and the file."""
  try:
    yield
  except ConfigError:
    raise
  except Exception as e:  # OSError, EOFError, zstandard.ZstdError, pyarrow.ArrowInvalid, ...
    raise ConfigError(f"{where}: cannot read {path} ({type(e).__name__}: {str(e)[:200]}). Fix or remove the "
                      "file, or leave it out of the globs.") from e


# ---------------------------------------------------------------------------------------------------
# Files


def _patterns(value: str) -> list[str]:
  return [p.strip() for p in value.split(",") if p.strip()]


def _glob(pattern: str) -> list[str]:
  if is_remote(pattern):
    scheme, rest = pattern.split("://", 1)
    root, *parts = rest.split("/")
    base = epath.Path(f"{scheme}://{root}")
    return sorted(os.fspath(p) for p in base.glob("/".join(parts))) if parts else [pattern]
  return sorted(os.path.abspath(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True))


def files(src: SourceConfig, part: str) -> list[str]:
  """The files of a part ("train" or "validation"), sorted; ConfigError when a pattern matches none."""
  value = src.path if part == "train" else src.validation
  if src.kind == "text_files" and part == "train" and not value:
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")
    # Third-party packages are not the standard library, and would make the corpus depend on the venv.
    excluded = {"site-packages", "dist-packages"}
    return sorted(p for p in globlib.glob(stdlib, recursive=True)
                  if os.path.isfile(p) and not excluded & set(p.split(os.sep)))
  found = []
  # A validation file that the train globs also match (train.txt and val.txt under *.txt) is validation's.
  excluded = set(files(src, "validation")) if part == "train" and src.validation else set()
  for pattern in _patterns(value):
    try:
      matched = [p for p in _glob(pattern) if is_remote(p) or not os.path.isdir(p)]
    except Exception as e:  # a remote file system's own errors (no credentials, no network, no bucket)
      field = "path" if part == "train" else "validation"
      raise ConfigError(f"{key(src)}.{field}: cannot list {pattern!r} ({str(e)[:300]}). Check the path and "
                        "your access to it (gcloud auth application-default login).") from e
    if not matched:
      field = "path" if part == "train" else "validation"
      raise ConfigError(f"{key(src)}.{field} = {value!r}: {pattern!r} matches no file. Fix the "
                        "comma-separated globs (local paths or gs://...).")
    found.extend(matched)
  return sorted(set(found) - excluded)


def _size(path: str) -> int | None:
  """A local file's size; None for a remote one (a request per file would make start-up grow with the
  number of files: thousands for a published corpus)."""
  return None if is_remote(path) else os.path.getsize(path)


def settings(src: SourceConfig) -> dict:
  """The settings the prepared tokens of the source depend on (besides the tokenizer): what names its
  preparation. Not its files: listing them at every start would grow with the corpus, and a pod that
  trains on prepared data need not see the raw files at all."""
  out = dataclasses.asdict(src)
  for name in ("name", "weight"):  # a mixture's weight is applied when reading, not when preparing
    out.pop(name)
  if src.kind == "text_files" and not src.path:  # the standard library of this Python version
    out["path"] = sysconfig.get_paths()["stdlib"]
  return out


def identity(src: SourceConfig) -> dict:
  """Its settings, and each file's path and (when local) size: recorded when the source is prepared."""
  if src.kind == "tfds":
    return settings(src)
  listed = {part: [(p, _size(p)) for p in files(src, part)]
            for part in ("train", "validation") if part == "train" or src.validation}
  return {**settings(src), "files": listed}


def check(src: SourceConfig) -> None:
  """Fails at startup, before any tokenizing, when the source cannot be read."""
  if src.kind == "tfds":
    _tfds_builder(src)
    return
  for part in ("train", "validation") if src.validation else ("train",):
    paths = files(src, part)
    if not paths:
      raise ConfigError(f"{key(src)}.path matches no file; set it to comma-separated globs.")
    if all(_size(p) == 0 for p in paths):
      raise ConfigError(f"{key(src)}: the {part} files ({len(paths)}) are all empty: the corpus is empty.")


# ---------------------------------------------------------------------------------------------------
# Chunks (main process: reading only)


def chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  """The raw input of the part, chunk after chunk, at most max_documents documents in all."""
  reader = {"text_files": _text_file_chunks, "jsonl": _jsonl_chunks, "chat": _jsonl_chunks, "parquet": _parquet_chunks,
            "text": _text_chunks, "tfds": _tfds_chunks}[src.kind]
  return reader(src, part)


def _text_file_chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  paths = files(src, part)
  if src.max_documents:
    paths = paths[:src.max_documents]
  for start in range(0, len(paths), CHUNK_FILES):
    yield Chunk("text_files", paths[start:start + CHUNK_FILES], where=key(src))


def _open(path: str):
  raw = epath.Path(path).open("rb")
  if path.endswith(".gz"):
    return gzip.open(raw)
  if path.endswith(".zst"):
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
  return raw


def _jsonl_chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  """Blocks of about CHUNK_BYTES of whole lines: the workers split and parse them, so that the main
  process does little more than read (a line at a time in Python would cost it a tenth of a core). A
  chat source's chunks are these too, of its kind."""
  left = src.max_documents or None
  for path in files(src, part):
    with _reading(key(src), path), _open(path) as f:
      tail, line = b"", 1
      while block := f.read(CHUNK_BYTES):
        block = tail + block
        cut = block.rfind(b"\n") + 1
        block, tail = block[:cut], block[cut:]
        if block:
          if left is not None:
            block, left = _first_lines(block, left)
          yield Chunk(src.kind, (path, block), src.text_field, key(src), line=line)
          line += block.count(b"\n")
          if left == 0:
            return
      if tail.strip():
        yield Chunk(src.kind, (path, _first_lines(tail, left)[0] if left else tail), src.text_field, key(src),
                    line=line)


def _first_lines(block: bytes, count: int) -> tuple[bytes, int]:
  """The block's first `count` non-blank lines, and how many of `count` are left."""
  lines = [line for line in block.split(b"\n") if line.strip()][:count]
  return b"\n".join(lines), count - len(lines)


def _parquet_chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  import pyarrow.parquet as pq

  left = src.max_documents or None
  for path in files(src, part):
    with _reading(key(src), path), epath.Path(path).open("rb") as f:
      table = pq.ParquetFile(f)
      if src.text_field not in table.schema_arrow.names:
        raise ConfigError(f"{key(src)}.text_field = {src.text_field!r} is not a column of {path}; it has "
                          f"{table.schema_arrow.names}.")
      for batch in table.iter_batches(batch_size=CHUNK_DOCUMENTS, columns=[src.text_field]):
        texts = [t for t in batch.column(0).to_pylist() if t is not None]
        if left is not None:
          texts, left = texts[:left], left - min(left, len(texts))
        yield Chunk("texts", texts, where=key(src))
        if left == 0:
          return


def _text_chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  separator = re.compile(r"\n[ \t\r]*\n\s*" if not src.separator else re.escape(src.separator))
  left = src.max_documents or None
  texts, invalid = [], {}  # the bytes that are not UTF-8 of the files read, sent with the next chunk
  for path in files(src, part):
    counted = [0]
    for document in _reading_each(key(src), path, _split_stream(key(src), path, separator, counted)):
      texts.append(document)
      if left is not None:
        left -= 1
      if len(texts) == CHUNK_DOCUMENTS or left == 0:
        yield Chunk("texts", texts, where=key(src), invalid=invalid)
        texts, invalid = [], {}
        if left == 0:
          return
    if counted[0]:
      invalid[path] = counted[0]
  if texts or invalid:
    yield Chunk("texts", texts, where=key(src), invalid=invalid)


def _reading_each(where: str, path: str, items: Iterator) -> Iterator:
  with _reading(where, path):
    yield from items


def _split_stream(where: str, path: str, separator: re.Pattern, counted: list[int]) -> Iterator[str]:
  """The documents of one large file, read a block at a time (memory bounded by the longest document);
  `counted[0]`: its bytes that are not UTF-8, once read (ConfigError when it is not text)."""
  with _open(path) as raw:
    f = io.TextIOWrapper(raw, encoding="utf-8", errors=_COUNT_INVALID, newline="")
    tail, characters = "", 0
    while True:
      block, invalid = _counted(lambda: f.read(_BLOCK_BYTES))
      if not block:
        break
      characters, counted[0] = characters + len(block), counted[0] + invalid
      _check_text(where, path, characters, block.count("\0") if "\0" in block else 0, 0)
      pieces = separator.split(tail + block)
      tail = pieces.pop()
      yield from (p for p in pieces if p.strip())
    _check_text(where, path, characters, 0, counted[0])
    if tail.strip():
      yield tail


def _tfds_builder(src: SourceConfig):
  import tensorflow_datasets as tfds  # here: TFDS (TensorFlow) only for a source of this kind

  try:
    builder = tfds.builder(src.path)
  except tfds.core.DatasetNotFoundError as e:
    raise ConfigError(f"{key(src)}.path = {src.path!r} is not a registered TFDS dataset; use a name from "
                      "https://www.tensorflow.org/datasets/catalog, or another kind.") from e
  if not builder.is_prepared() and (unreachable := _unreachable_host(getattr(builder, "url_infos", None) or {})):
    # TFDS would retry the download for minutes before failing.
    raise ConfigError(_not_prepared(src, builder, f"it is not prepared there, and its download host {unreachable}"))
  try:
    builder.download_and_prepare()  # nothing to do once prepared
  except Exception as e:  # no network, a manual download missing, a failed generation: TFDS's many types
    reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    raise ConfigError(_not_prepared(src, builder, reason)) from e
  if src.text_field not in builder.info.features:
    raise ConfigError(f"{key(src)}.text_field = {src.text_field!r} is not a feature of {src.path}; it has "
                      f"{sorted(builder.info.features.keys())}.")
  for field, split in (("train_split", src.train_split), ("validation", src.validation)):
    if split:
      _check_tfds_split(builder, f"{key(src)}.{field} = {split!r}", split, src.path)
  return builder


def _not_prepared(src: SourceConfig, builder, reason: str) -> str:
  return (f"{key(src)}.path = {src.path!r}: TFDS could not download and prepare it into {builder.data_dir} "
          f"({reason}). Prepare it where the download works (`tfds build {src.path}`) and copy it there, or set "
          "TFDS_DATA_DIR to where it is prepared.")


_PORTS = {"https": 443, "http": 80, "ftp": 21}
_PROXIES = ("https_proxy", "http_proxy", "all_proxy")
PROBE_SECONDS = 3.0


def _unreachable_host(urls) -> str:
  """'host:port cannot be reached (error)' for the first host of a dataset's download URLs that a connection
  does not reach within PROBE_SECONDS; empty when all do, or when a proxy is set (downloads go through it)."""
  if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXIES):
    return ""
  hosts = set()
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and parts.scheme in _PORTS:
      hosts.add((parts.hostname, parts.port or _PORTS[parts.scheme]))
  for host, port in sorted(hosts)[:3]:  # a few seconds at most
    try:
      socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
      return f"{host}:{port} cannot be reached ({e})"
  return ""


def _check_tfds_split(builder, where: str, split: str, name: str) -> None:
  """A split that names a split of the dataset, in TFDS's slicing syntax, and selects at least one example."""
  splits = builder.info.splits
  if split.partition("[")[0] not in splits:
    raise ConfigError(f"{where} is not a split of {name}; it has {sorted(splits.keys())}.")
  try:
    examples = splits[split].num_examples
  except (ValueError, AssertionError) as e:  # TFDS's parse errors of the slice
    raise ConfigError(f"{where} is not a TFDS split ({(str(e).splitlines() or [''])[0][:200]}); write a split "
                      "or a slice of one, e.g. 'train[:90%]' (https://www.tensorflow.org/datasets/splits).") from e
  if examples == 0:
    whole = split.partition("[")[0]
    raise ConfigError(f"{where} selects no example of {name} (its {whole!r} split has "
                      f"{splits[whole].num_examples:,}); widen the slice, e.g. '{whole}[:90%]'.")


def _tfds_chunks(src: SourceConfig, part: str) -> Iterator[Chunk]:
  import tensorflow_datasets as tfds

  builder = _tfds_builder(src)
  split = src.train_split if part == "train" else src.validation
  # Streamed from TFDS's record files in their fixed order, never held whole.
  ds = builder.as_dataset(split=split, shuffle_files=False).map(lambda example: example[src.text_field])
  if src.max_documents:
    ds = ds.take(src.max_documents)
  texts = []
  for text in tfds.as_numpy(ds):
    texts.append(text.decode("utf-8", errors="replace"))
    if len(texts) == CHUNK_DOCUMENTS:
      yield Chunk("texts", texts, where=key(src))
      texts = []
  if texts:
    yield Chunk("texts", texts, where=key(src))


# ---------------------------------------------------------------------------------------------------
# Decoding (worker processes)


_COUNT_INVALID = "lm.count_invalid"  # the "replace" error handler, counting the bytes it replaces
_invalid = threading.local()


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
  _invalid.count += error.end - error.start
  return "\ufffd", error.end  # as "replace": one U+FFFD for each invalid sequence


codecs.register_error(_COUNT_INVALID, _replace_and_count)


def _counted(decode):
  """(decode(), the bytes that decode() replaced as not UTF-8): decode decodes with errors=_COUNT_INVALID."""
  _invalid.count = 0
  out = decode()
  return out, _invalid.count


def _check_text(where: str, path: str, size: int, nul: int, invalid: int) -> None:
  """ConfigError naming the file when `size` bytes of it, `nul` of them NUL and `invalid` not UTF-8, are
  not text."""
  fix = (f"Leave it out of the globs of {where} (path or validation: e.g. *.py rather than *), or convert "
         "it to UTF-8 text.")
  if nul:
    raise ConfigError(f"{where}: {path} is binary, not text: it holds NUL bytes ({nul:,} in {size:,}). {fix}")
  if invalid > MAX_INVALID_BYTES and invalid > MAX_INVALID_FRACTION * size:
    raise ConfigError(f"{where}: {path} is not UTF-8 text: {invalid:,} of its {size:,} bytes are not UTF-8 "
                      f"({invalid / max(size, 1):.1%}; another encoding such as Latin-1, or binary data), which "
                      f"would become U+FFFD. {fix}")


def describe_invalid(invalid: dict[str, int]) -> str:
  """The files that held bytes that are not UTF-8 (few enough to be kept), for the log."""
  listed = ", ".join(f"{path} ({count:,})" for path, count in sorted(invalid.items())[:5])
  more = f" and {len(invalid) - 5} more" if len(invalid) > 5 else ""
  return (f"{len(invalid)} file(s) hold bytes that are not UTF-8, {sum(invalid.values()):,} in all, decoded as "
          f"U+FFFD: {listed}{more}. Convert them to UTF-8 or leave them out of the globs for a clean corpus.")


@dataclasses.dataclass(frozen=True)
class Decoded:
  texts: list[str]  # a chat source's: its lines (what `held_out` hashes)
  invalid: dict[str, int]  # {path: its bytes that are not UTF-8} of the files that had any
  conversations: list[Conversation] | None = None  # a chat source's, one per text


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A line of a chat source: its messages, the index of the first one learned, and where it is."""
  messages: list[dict]
  learn_from: int
  where: str


def documents(chunk: Chunk) -> list[tuple[str, str]]:
  """(what `held_out` hashes, the text) of each document of a chunk, in order: a conversation is hashed on
  its line, as its preparation does, and its text is its messages' contents, one per line. ConfigError
  naming the source when its input is not as declared."""
  decoded = decode(chunk)
  if decoded.conversations is None:
    return [(text, text) for text in decoded.texts]
  return [(line, "\n".join(m["content"] for m in c.messages))
          for line, c in zip(decoded.texts, decoded.conversations)]


def decode(chunk: Chunk) -> Decoded:
  """The texts of a chunk and its bytes that are not UTF-8 (decoded as U+FFFD): ConfigError naming the
  file when it is not text, or naming the source when its input is not as declared."""
  if chunk.kind == "texts":
    return Decoded(chunk.payload, dict(chunk.invalid))
  if chunk.kind == "text_files":
    texts, invalid = [], {}
    for path in chunk.payload:
      with _reading(chunk.where, path):
        data = epath.Path(path).read_bytes()
      text, invalid[path] = _counted(lambda: data.decode("utf-8", errors=_COUNT_INVALID))
      _check_text(chunk.where, path, len(data), data.count(0) if b"\0" in data else 0, invalid[path])
      texts.append(text)
    return Decoded(texts, {path: n for path, n in invalid.items() if n})
  path, block = chunk.payload
  numbered, invalid = _counted(lambda: [(n, line.decode("utf-8", errors=_COUNT_INVALID))
                                        for n, line in enumerate(block.split(b"\n"), chunk.line) if line.strip()])
  _check_text(chunk.where, path, len(block), block.count(0) if b"\0" in block else 0, invalid)
  invalid = {path: invalid} if invalid else {}
  if chunk.kind == "chat":
    conversations = [_conversation(_json_line(chunk, path, line), f"{chunk.where}: {path} line {n}")
                     for n, line in numbered]
    return Decoded([line for _, line in numbered], invalid, conversations)
  return Decoded(_json_texts(chunk, path, [line for _, line in numbered]), invalid)


def _json_line(chunk: Chunk, path: str, line: str):
  try:
    return json.loads(line)
  except ValueError as e:
    raise ConfigError(f"{chunk.where}: {path} has a line that is not JSON ({e}): "
                      f"{line[:80]!r}. Fix or remove the file.") from e


CHAT_FORMATS = ('{"messages": [{"role": ..., "content": ...}, ...]}, or {"prompt": ..., "completion": ...} (two '
                'strings, or two lists of messages)')


def _conversation(record, where: str) -> Conversation:
  """A chat line's conversation; ConfigError naming the file and line when it is neither format."""
  from lm.data import chat  # here: only chat sources need it

  if isinstance(record, dict) and "messages" in record:
    messages, learn_from = record["messages"], 0
  elif isinstance(record, dict) and "prompt" in record and "completion" in record:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
      prompt, completion = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
      raise ConfigError(f"{where}: prompt and completion are two strings or two lists of messages, not a "
                        f"{type(prompt).__name__} and a {type(completion).__name__}.")
    messages, learn_from = prompt + completion, len(prompt)
  else:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(f"{where} is not a conversation (it has {fields}); a chat source's line is {CHAT_FORMATS}.")
  chat.check_messages(messages, where)  # an assistant message to learn: Chat.tokenize checks it
  return Conversation(messages, learn_from, where)


def _json_texts(chunk: Chunk, path: str, lines: list[str]) -> list[str]:
  """The `chunk.field` of each JSON line."""
  texts = []
  for line in lines:
    record = _json_line(chunk, path, line)
    if not isinstance(record, dict) or chunk.field not in record:
      fields = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ConfigError(f"{chunk.where}.text_field = {chunk.field!r}: a record of {path} has no such field; "
                        f"it has {fields}. Set text_field to the field holding the text.")
    text = record[chunk.field]
    if text is None:  # as a Parquet null: no document
      continue
    if not isinstance(text, str):
      raise ConfigError(f"{chunk.where}.text_field = {chunk.field!r}: a record of {path} holds a "
                        f"{type(text).__name__} there, not text ({str(text)[:60]!r}). Name a field of strings.")
    texts.append(text)
  return texts
