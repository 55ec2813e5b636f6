"""scripts/prepare_data.py: prepares, reopens, verifies and repairs, as a user runs it."""

import json
import os
import subprocess
import sys

from tests.test_data import _jsonl_corpus
from tests.test_train import ROOT


def _run(tmp_path, *flags):
  command = [sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), f"--config={ROOT}/configs/default.py",
             "--config.data.tokenizer=byte", "--config.data.sources.main.kind=jsonl",
             f"--config.data.sources.main.path={tmp_path / 'src' / 'docs.jsonl'}",
             f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.shard_tokens=2000", *flags]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_prepare_verify_and_repair(tmp_path):
  _jsonl_corpus(tmp_path / "src", count=24_000)  # ~4.3 MB: 5 chunks of 1 MiB, so 5 shards
  first = _run(tmp_path, "--verify")
  assert first.returncode == 0, first.stderr[-2000:]
  assert "this run tokenized" in first.stdout and "shard files match their CRC-32" in first.stdout
  assert "tensorflow" not in first.stderr.lower()
  again = _run(tmp_path)
  assert again.returncode == 0 and "already prepared" in again.stdout, again.stderr[-2000:]
  (directory,) = (tmp_path / "data" / "prepared").iterdir()
  shard = directory / "train-00002.tokens"
  content = shard.read_bytes()
  shard.write_bytes(bytes([content[0] ^ 4]) + content[1:])
  damaged = _run(tmp_path, "--verify")
  assert damaged.returncode == 1 and f"BAD: {shard}" in damaged.stdout and "--repair" in damaged.stderr
  repaired = _run(tmp_path, "--repair", "--verify")
  assert repaired.returncode == 0, repaired.stderr[-2000:]
  assert shard.read_bytes() == content and "Damaged:" in repaired.stderr
  # What was prepared again is reported: shards 2 on (it said "tokenized 0 tokens").
  manifest = json.loads((directory / "manifest.json").read_text())
  again = sum(s[part]["tokens"] for s in manifest["shards"][2:] for part in ("train", "validation"))
  assert again > 0 and f"this run tokenized {again:,} tokens" in repaired.stdout, repaired.stdout
