"""The data preparation's figures on synthetic corpora: memory, disk, throughput, time to the first batch.

  python scripts/benchmark_data.py --sizes_mb=30,600,3000 [--workdir=/data/bench] [--keep]

For each size, writes once (deterministically, offline) a corpus of about that many MB of text: JSON Lines
files of documents of 100 to 5,000 characters, three quarters pseudo-English prose and a quarter code-like
text. A SentencePiece tokenizer (--vocab_size, or 8192 when the sample cannot support that many pieces)
is trained once by lm.data.corpus on the first --tokenizer_sample_mb of the smallest corpus; --tokenizers may
add the byte tokenizer. Then, per size and tokenizer, each in a process of its own:
  * the preparation (lm.data.corpus.prepare_all into a fresh data_dir), once per --workers value: tokens/s;
    the peak resident memory of the main process and of the largest worker (getrusage), and the peak of
    the whole process tree (sum of PSS, sampled every 0.2 s); the CPU seconds of the main process and
    of the workers; bytes on disk per token; whether the shards are bitwise the same for every number
    of workers;
  * a fresh process that opens the prepared data and reads the first train batch (lm.data.corpus.prepare_all,
    train_batches(...).get(0)): seconds from launching the process to the batch, and the parts of it.
    It should not grow with the corpus. The shards were just written, so they are in the page cache.
Prints two tables at the end (--output also writes the figures as JSON). Logs of every process:
<workdir>/logs. Corpora in a given --workdir are kept (a later run reuses them); a temporary workdir is
deleted at the end, and prepared data after each size, unless --keep.
A SentencePiece model trained on synthetic words compresses better than on real text (fewer distinct
words): compare bytes/token with care. Throughput needs an otherwise idle machine (the CPU seconds
show contention: w2 slower than w1 for the same CPU seconds in all means the cores were busy).
"""

import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import numpy as np  # noqa: E402

_SIZES = flags.DEFINE_list("sizes_mb", ["30", "600", "3000"], "Corpus sizes, MB of document text.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the corpora (and prepared data, logs) go; empty: a "
                               "temporary directory, deleted at the end unless --keep.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the prepared data and the temporary workdir.")
_TOKENIZERS = flags.DEFINE_list("tokenizers", ["sentencepiece", "byte"], "Tokenizers to measure.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "config.data.workers values to measure.")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "SentencePiece pieces (8192 if the sample is too poor).")
_SAMPLE_MB = flags.DEFINE_integer("tokenizer_sample_mb", 20, "MB of text the tokenizer is trained on.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Row length of the first-batch measurement.")
_BATCH = flags.DEFINE_integer("batch_rows", 64, "Rows of the first train batch read.")
_FIRST_BATCH_RUNS = flags.DEFINE_integer("first_batch_runs", 2, "Fresh processes timed per first batch.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write every figure to this JSON file.")
_CHILD = flags.DEFINE_enum("child", "", ["", "tokenizer", "prepare", "first_batch"], "Internal: the "
                           "measurement this process makes (its arguments in --child_args).")
_CHILD_ARGS = flags.DEFINE_string("child_args", "{}", "Internal: JSON arguments of --child.")

_FILE_MB = 64  # text per corpus file; file k of every size starts with the same documents
_BLOCK_BYTES = 1 << 20  # text generated at a time (one kind: prose or code)
_MB = 1 << 20


# ---------------------------------------------------------------------------------------------------
# Synthetic corpora


def _vocabularies() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """(words as bytes, probabilities) of prose and of code: pseudo-words made of syllables, Zipf-weighted."""
  rng = np.random.default_rng(1234)
  syllables = [o + v + c for o in ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t",
                                   "v", "w", "z", "st", "tr", "pl", "ch", "sh", "th", "br", "gr", "qu"]
               for v in ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y", "ie"]
               for c in ["", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st"]]
  parts = rng.integers(0, len(syllables), (60000, 3))
  counts = rng.integers(1, 4, 60000)
  # A dict keeps the first occurrence of each word in order: the same words in every process.
  made = list(dict.fromkeys("".join(syllables[i] for i in row[:n]) for row, n in zip(parts, counts)))[:40000]
  common = ("the of and to a in is that for it as with was on be by this are or from at which but not have "
            "an they their we can more one all been has").split()
  foreign = ["café", "naïve", "über", "straße", "données", "año", "東京", "数据", "москва", "ελληνικά"]
  prose = common + made[:30000] + [w.capitalize() for w in made[:3000]] + foreign + ["1999", "42", "3.14"]
  idents = [f"{a}_{b}" for a, b in zip(made[30000:35000], made[35000:40000])] + made[30000:33000]
  code = ("def return if else for in import from class self None True False while with as try except "
          "( ) : = == + - * [ ] , . { } 0 1 2 #").split() + idents
  lines = {"\n": 0.06, "\n    ": 0.05, "\n        ": 0.03, "\n\n": 0.01}  # code lines of ~6 tokens
  return _zipf(prose, {",": 0.06, ".": 0.05, "\n": 0.008}), _zipf(code, lines)


def _zipf(words: list[str], fixed: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
  weights = 1.0 / (np.arange(len(words)) + 2.7)
  weights *= (1.0 - sum(fixed.values())) / weights.sum()
  tokens = np.array([w.encode() for w in words + list(fixed)], dtype=object)
  return tokens, np.concatenate([weights, list(fixed.values())])


def _block(rng: np.random.Generator, words: np.ndarray, p: np.ndarray) -> bytes:
  drawn = words[rng.choice(len(words), _BLOCK_BYTES // 6, p=p)]
  text = b" ".join(drawn)
  for old, new in ((b" ,", b","), (b" .", b"."), (b" \n", b"\n"), (b"\n ", b"\n"), (b"\n\n\n", b"\n\n")):
    text = text.replace(old, new)
  return text


def _write_file(path: str, seed: int, text_bytes: int, vocabularies) -> tuple[int, int]:
  """Documents of 100 to 5,000 characters (log-uniform), cut at spaces, as JSON Lines; (documents, bytes)."""
  rng = np.random.default_rng([seed, 7])
  documents = written = 0
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    while written < text_bytes:
      words, p = vocabularies[0] if rng.random() < 0.75 else vocabularies[1]
      block, start = _block(rng, words, p), 0
      for length in np.exp(rng.uniform(math.log(100), math.log(5000), 1024)).astype(int):
        end = block.find(b" ", start + int(length))
        if end < 0 or written >= text_bytes:
          break
        text = block[start:end].strip().decode("utf-8")
        f.write(json.dumps({"id": f"{seed}-{documents}", "text": text}, ensure_ascii=False) + "\n")
        documents, written, start = documents + 1, written + len(text.encode()), end + 1
  os.replace(path + ".tmp", path)
  return documents, written


def _write_corpus(workdir: str, size_mb: int) -> dict:
  """The corpus of size_mb MB of text under workdir (written unless a finished one is there)."""
  directory = os.path.join(workdir, f"corpus_{size_mb}mb")
  done = os.path.join(directory, "done.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(directory, exist_ok=True)
  started, vocabularies = time.time(), _vocabularies()
  documents = written = 0
  for k in range(math.ceil(size_mb / _FILE_MB)):
    n, b = _write_file(os.path.join(directory, f"part-{k:04d}.jsonl"), k,
                       min(_FILE_MB, size_mb - k * _FILE_MB) * _MB, vocabularies)
    documents, written = documents + n, written + b
  info = {"directory": directory, "size_mb": size_mb, "documents": documents, "text_bytes": written,
          "file_bytes": sum(os.path.getsize(os.path.join(directory, p)) for p in os.listdir(directory))}
  print(f"Wrote {directory}: {documents:,} documents, {written:,} bytes of text in {time.time() - started:.0f} s",
        flush=True)
  with open(done, "w") as f:
    json.dump(info, f)
  return info


# ---------------------------------------------------------------------------------------------------
# Child processes (each measurement in a process of its own)


def _config(args: dict):
  from configs import base
  from lm.config import from_config_dict

  c = base.get_config()
  c.model.vocab_size = args["vocab_size"]
  c.data.sources.main = base.source(kind="jsonl", path=os.path.join(args["corpus"], "*.jsonl"))
  c.data.data_dir = args["data_dir"]
  c.data.tokenizer = args["tokenizer"]
  c.data.tokenizer_path = args.get("tokenizer_path", "")
  c.data.tokenizer_sample_bytes = args.get("sample_bytes", c.data.tokenizer_sample_bytes)
  c.data.workers = args.get("workers", 0)
  c.train.seq_len = c.model.max_seq_len = args.get("seq_len", 2048)
  return from_config_dict(c)


def _proc_descendants(pid: int) -> list[int]:
  found = []
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except OSError:
    return found
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        children = [int(c) for c in f.read().split()]
    except OSError:
      continue
    for child in children:
      found += [child, *_proc_descendants(child)]
  return found


def _pss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/smaps_rollup") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
  except (OSError, StopIteration):
    return 0.0


class _TreeMemory(threading.Thread):
  """The peak of the summed PSS of this process and its descendants (shared pages counted once)."""

  def __init__(self):
    super().__init__(daemon=True)
    self.peak_mb, self._done = 0.0, threading.Event()

  def run(self):
    while not self._done.wait(0.2):
      pids = [os.getpid(), *_proc_descendants(os.getpid())]
      self.peak_mb = max(self.peak_mb, sum(_pss_mb(p) for p in pids))

  def stop(self) -> float:
    self._done.set()
    self.join()
    return self.peak_mb


def _rss_now_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peaks() -> dict:
  """Peak RSS (Linux reports ru_maxrss in KiB) and CPU seconds of this process and of its finished
  children (for ru_maxrss the largest one: the largest worker)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"main_peak_mb": own.ru_maxrss / 1024, "worker_peak_mb": children.ru_maxrss / 1024,
          "main_cpu_s": own.ru_utime + own.ru_stime, "workers_cpu_s": children.ru_utime + children.ru_stime}


def _child_tokenizer(args: dict) -> dict:
  """Trains the SentencePiece model (lm.data.corpus: the first sample_bytes of the corpus), 8192 pieces if the
  sample cannot support vocab_size."""
  from lm.data import corpus
  from lm.errors import ConfigError

  started, vocab = time.time(), args["vocab_size"]
  try:
    tokenizer = corpus.load_tokenizer(_config(args).data, vocab)
  except ConfigError as e:
    if vocab <= 8192:
      raise
    logging.warning("%s: %s; trying 8192 pieces", vocab, e)
    vocab = 8192
    tokenizer = corpus.load_tokenizer(_config({**args, "vocab_size": vocab}).data, vocab)
  models = sorted(os.listdir(os.path.join(args["data_dir"], "tokenizers")))
  return {"vocab_size": tokenizer.vocab_size, "seconds": time.time() - started, **_peaks(),
          "path": os.path.join(args["data_dir"], "tokenizers", [m for m in models if f"_{vocab}_" in m][0])}


def _child_prepare(args: dict) -> dict:
  """One preparation from scratch: its time, memory, and what it wrote."""
  memory = _TreeMemory()
  memory.start()
  from etils import epath
  from lm.data import corpus

  cfg, rss_imported = _config(args), _rss_now_mb()
  started = time.time()
  _, prepared = corpus.prepare_all(cfg.data, cfg.model.vocab_size)
  seconds = time.time() - started
  tree_peak = memory.stop()
  p = prepared["main"]
  shards = p.manifest["shards"]
  tokens = sum(s[part]["tokens"] for s in shards for part in ("train", "validation"))
  crcs = json.dumps([[s[part]["crc32"] for part in ("train", "validation")] for s in shards], sort_keys=True)
  return {"seconds": seconds, "tokens": tokens, "documents": sum(s["documents"] for s in shards),
          "text_bytes": sum(s["bytes"] for s in shards), "shards": len(shards), "tokens_per_s": tokens / seconds,
          "disk_bytes": sum(f.stat().length for f in epath.Path(p.directory).iterdir()),
          "crc": hashlib.sha256(crcs.encode()).hexdigest()[:16], "rss_after_imports_mb": rss_imported,
          "tree_pss_peak_mb": tree_peak, **_peaks()}


def _child_first_batch(args: dict) -> dict:
  """A fresh process: open the prepared data, read the first train batch."""
  from lm.data import corpus

  imported, cfg = time.time(), _config(args)
  _, prepared = corpus.prepare_all(cfg.data, cfg.model.vocab_size)
  opened = time.time()
  batch = corpus.train_batches(prepared, args["seq_len"], 0, args["batch_rows"]).get(0)
  done = time.time()
  assert batch["tokens"].shape == (args["batch_rows"], args["seq_len"])
  return {"from_launch_s": done - args["launched"], "to_imports_done_s": imported - args["launched"],
          "open_s": opened - imported, "get_s": done - opened}


def _run_child(mode: str, args: dict, log_dir: str, name: str) -> dict:
  """Runs this script as --child=mode; its RESULT line. Its stdout and stderr go to log_dir/name.log."""
  os.makedirs(log_dir, exist_ok=True)
  args = {**args, "launched": time.time()}
  command = [sys.executable, os.path.abspath(__file__), f"--child={mode}", f"--child_args={json.dumps(args)}"]
  log = os.path.join(log_dir, name + ".log")
  with open(log, "w") as f:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True, check=False)
    f.write(done.stdout)
  results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
  if done.returncode != 0 or not results:
    raise RuntimeError(f"{mode} {name} failed (exit {done.returncode}); see {log}")
  return json.loads(results[-1])


# ---------------------------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class _Measured:
  size_mb: int
  tokenizer: str
  prepare: dict  # workers -> the prepare child's result
  first_batch: list  # first_batch child results


def _measure(workdir: str, corpus_info: dict, tokenizer: str, spm: dict | None) -> _Measured:
  size = corpus_info["size_mb"]
  common = {"corpus": corpus_info["directory"], "tokenizer": tokenizer, "seq_len": _SEQ_LEN.value,
            "vocab_size": spm["vocab_size"] if spm else 32000,
            "tokenizer_path": spm["path"] if spm else ""}
  logs, prepared, data_dir = os.path.join(workdir, "logs"), {}, ""
  for workers in [int(w) for w in _WORKERS.value]:
    if data_dir and not _KEEP.value:  # one preparation on disk at a time (the byte tokenizer's are large)
      shutil.rmtree(data_dir, ignore_errors=True)
    data_dir = os.path.join(workdir, "prepared", f"{size}mb_{tokenizer}_w{workers}")
    shutil.rmtree(data_dir, ignore_errors=True)  # every preparation from scratch
    print(f"Preparing {size} MB, {tokenizer}, {workers} workers ...", flush=True)
    prepared[workers] = {**_run_child("prepare", {**common, "data_dir": data_dir, "workers": workers}, logs,
                                      f"prepare_{size}mb_{tokenizer}_w{workers}"), "data_dir": data_dir}
  first = [_run_child("first_batch", {**common, "data_dir": data_dir, "batch_rows": _BATCH.value}, logs,
                      f"first_batch_{size}mb_{tokenizer}_{n}") for n in range(_FIRST_BATCH_RUNS.value)]
  if not _KEEP.value:
    shutil.rmtree(data_dir, ignore_errors=True)
  return _Measured(size, tokenizer, prepared, first)


def _table(header: list[str], rows: list[list]) -> str:
  cells = [header] + [[f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
                       for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _print_tables(measured: list[_Measured]) -> None:
  rows = []
  for m in measured:
    for workers, p in m.prepare.items():
      rows.append([m.size_mb, m.tokenizer, workers, p["documents"], p["tokens"], p["shards"], p["seconds"],
                   round(p["tokens_per_s"]), p["text_bytes"] / p["tokens"], p["disk_bytes"] / p["tokens"],
                   p["rss_after_imports_mb"], p["main_peak_mb"], p["worker_peak_mb"], p["tree_pss_peak_mb"],
                   p["main_cpu_s"], p["workers_cpu_s"]])
  print("\nPreparation (one process per row, from scratch; memory in MB)")
  print(_table(["MB", "tokenizer", "workers", "documents", "tokens", "shards", "seconds", "tokens/s",
                "text B/token", "disk B/token", "main RSS imports", "main RSS peak", "worker RSS peak",
                "tree PSS peak", "main CPU s", "workers CPU s"], rows))
  rows = []
  for m in measured:
    w = sorted(m.prepare)  # the ratio of the most workers to the fewest
    ratio = m.prepare[w[-1]]["tokens_per_s"] / m.prepare[w[0]]["tokens_per_s"]
    same = len({p["crc"] for p in m.prepare.values()}) == 1
    best = min(m.first_batch, key=lambda r: r["from_launch_s"])
    rows.append([m.size_mb, m.tokenizer, f"{ratio:.2f} (w{w[-1]}/w{w[0]})", "yes" if same else "NO",
                 best["from_launch_s"], best["to_imports_done_s"], best["open_s"], best["get_s"],
                 " ".join(f"{r['from_launch_s']:.2f}" for r in m.first_batch)])
  print(f"\nThroughput ratio, identical shards, and first train batch ({_BATCH.value} x {_SEQ_LEN.value} "
        "tokens) in a fresh process: seconds from launch (best run), imports, open, get; all runs")
  print(_table(["MB", "tokenizer", "tokens/s ratio", "same shards", "first batch s", "imports s", "open s",
                "get s", "runs"], rows))


def _main(workdir: str) -> None:
  sizes = sorted(int(s) for s in _SIZES.value)
  corpora = [_write_corpus(workdir, size) for size in sizes]
  spm = None
  if "sentencepiece" in _TOKENIZERS.value:
    print(f"Training the SentencePiece tokenizer on {_SAMPLE_MB.value} MB of {corpora[0]['directory']} ...",
          flush=True)
    spm = _run_child("tokenizer", {"corpus": corpora[0]["directory"], "tokenizer": "sentencepiece",
                                   "data_dir": os.path.join(workdir, "tokenizer"), "vocab_size": _VOCAB.value,
                                   "sample_bytes": _SAMPLE_MB.value * _MB}, os.path.join(workdir, "logs"),
                     "tokenizer")
    print(f"  {spm['vocab_size']} pieces in {spm['seconds']:.0f} s, peak RSS {spm['main_peak_mb']:.0f} MB: "
          f"{spm['path']}", flush=True)
  measured = [_measure(workdir, c, tok, spm if tok == "sentencepiece" else None)
              for c in corpora for tok in _TOKENIZERS.value]
  _print_tables(measured)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"corpora": corpora, "tokenizer": spm, "measured": [dataclasses.asdict(m) for m in measured]},
                f, indent=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CHILD.value:
    logging.set_verbosity(logging.INFO)  # the preparation's lines, into the child's log
    child = {"tokenizer": _child_tokenizer, "prepare": _child_prepare, "first_batch": _child_first_batch}
    print("RESULT " + json.dumps(child[_CHILD.value](json.loads(_CHILD_ARGS.value))), flush=True)
    return
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="benchmark_data_")
  os.makedirs(workdir, exist_ok=True)
  try:
    _main(workdir)
  finally:
    if not _WORKDIR.value and not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)
    elif not _WORKDIR.value:
      print(f"Kept {workdir}")


if __name__ == "__main__":
  app.run(main)
