"""Prepares every source of a config into token shards, before training (main.py would do it on first use).

  python scripts/prepare_data.py --config=configs/llama_1_36b.py [--config.data.workers=8] [--verify] [--repair]

Trains the SentencePiece tokenizer first when the config asks for one, then tokenizes each source of
config.data.sources in worker processes into `<config.data.data_dir>/prepared/<name>-<key>`. Resumable: a
rerun after a kill continues after the last finished shard, and a finished source is only opened. Prints
per source what was prepared, its shards, their bytes on disk and the tokens/s of this run. --verify then
reads every shard file and checks its CRC-32 against the manifest (exit 1 when one differs). --repair first
checks them and prepares again from the first damaged shard on, keeping the shards before it.
"""

import dataclasses
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is imported only for a tfds source
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from lm import config_file, console
from lm.config import Config, from_config_dict
from lm.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_VERIFY = flags.DEFINE_bool("verify", False, "After preparing, read every shard file and check its CRC-32 "
                            "against the manifest; list the files that differ and exit 1 if any does.")
_REPAIR = flags.DEFINE_bool("repair", False, "Before preparing, check every shard file's CRC-32 and prepare "
                            "again from the first damaged (or missing) shard on, keeping the ones before it.")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass
class _Result:
  prepared: object  # lm.data.corpus.Prepared
  new_tokens: int  # tokens tokenized by this run (0: it was prepared already)
  seconds: float  # of all the sources' preparation
  was_complete: bool


def _show_preparation_logs() -> None:
  """The preparation's INFO lines (lm's absl logs: shards, tokens/s), without the libraries' INFO
  chatter; --verbosity given: absl's own setting, unfiltered."""
  if flags.FLAGS["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.INFO)
  lm_dir = os.path.dirname(os.path.abspath(console.__file__)) + os.sep
  absl_logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.WARNING or record.pathname.startswith(lm_dir))


def _prepare(config: Config) -> list[_Result]:
  """lm.data.corpus.prepare_all, with what each source held before (for the report)."""
  from lm.data import corpus, prepare, token_store  # here: lm.data.corpus imports jax (a second or two)

  data = config.data
  started = time.time()
  tokenizer = corpus.load_tokenizer(data, config.model.vocab_size)  # trained here when it must be
  console.logger.info("Tokenizer: %s (%.1f s)", tokenizer.describe(), time.time() - started)
  if _REPAIR.value:  # first: what is prepared again is then counted as this run's
    corpus.repair_all(data, tokenizer)
  before = {src.name: token_store.read_manifest(os.fspath(corpus.prepared_directory(data, src, tokenizer)))
            or {"shards": []} for src in data.sources}
  started = time.time()
  _, prepared = corpus.prepare_all(data, config.model.vocab_size, new_tokenizer=True)
  seconds = time.time() - started
  return [_Result(p, prepare.tokens_in(p.manifest) - prepare.tokens_in(before[name]), seconds,
                  bool(before[name].get("complete"))) for name, p in prepared.items()]


def _disk_bytes(directory: str) -> int:
  from etils import epath

  return sum(p.stat().length for p in epath.Path(directory).iterdir() if p.is_file())


def _report(results: list[_Result]) -> None:
  from lm.data import prepare

  for r in results:
    p = r.prepared
    disk, tokens = _disk_bytes(p.directory), prepare.tokens_in(p.manifest)
    if r.was_complete:
      run = f"already prepared (opened in {r.seconds:.1f} s)"
    else:
      run = (f"this run tokenized {r.new_tokens:,} tokens in {r.seconds:.1f} s: "
             f"{r.new_tokens / max(r.seconds, 1e-9):,.0f} tokens/s")
    print(f"{p.source.name}: {p.describe()}")
    print(f"  {len(p.manifest['shards'])} shards, {disk:,} bytes on disk "
          f"({disk / max(tokens, 1):.2f} bytes/token); {run}")


def _verify(results: list[_Result]) -> list[str]:
  """The shard files of every source whose CRC-32 differs from the manifest's (or that are missing)."""
  from lm.data import token_store

  bad = []
  for r in results:
    started = time.time()
    found = token_store.verify(r.prepared.directory)
    files = 2 * len(r.prepared.manifest["shards"]) * 2  # train and validation, tokens and ends
    print(f"verify {r.prepared.source.name}: {files - len(found)} of {files} shard files match their "
          f"CRC-32 ({time.time() - started:.1f} s)")
    bad.extend(found)
  for path in bad:
    print(f"  BAD: {path}")
  return bad


def main(argv):
  console.start_command(argv)
  _show_preparation_logs()
  try:
    config = from_config_dict(_CONFIG.value)
    results = _prepare(config)
    _report(results)
    bad = _verify(results) if _VERIFY.value else []
    if bad:
      print("Damaged prepared data: run this again with --repair (it keeps the shards before the first "
            "damaged one and prepares the rest again).", file=sys.stderr)
      sys.exit(1)
  except ConfigError as e:
    print(f"Configuration error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=config_file.parse_flags)  # a bad --config: one line, no traceback
