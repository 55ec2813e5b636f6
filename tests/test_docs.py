"""The documentation cannot drift: docs/configuration.md against configs/base.py and lm/config.py, and the
startup lines that docs/gradient_accumulation.md explains against the code that prints them."""

import ast
import os
import re

import ml_collections
import pytest

from configs import base
from lm import config as lm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "configuration.md")
GUIDE = os.path.join(ROOT, "docs", "gradient_accumulation.md")
SECTIONS = ("model", "data", "train", "mesh", "grpo")

# `section.key` anywhere in the text, also inside `--config.section.key=...`. Not mentions: a path such as
# lm/training/train.py (the slash), a module path such as lm.training.train.evaluate (the dot), a bare file name such as
# train.py (the key "py").
MENTION = re.compile(r"(?:(?<=config\.)|(?<![\w/.]))(model|data|train|mesh|grpo)\.([A-Za-z_]\w*)")
# A table row of the reference: | `section.key` | type | `default` | allowed | what it does |
ROW = re.compile(r"^\|\s*`(model|data|train|mesh|grpo)\.(\w+)`\s*\|(.*)\|\s*$")
HEADING = re.compile(r"^##\s+(\S+)\s*$")

CHOICES = {
    "model.name": lm_config.MODEL_NAMES,
    "model.dtype": lm_config.DTYPES,
    "model.param_dtype": lm_config.DTYPES,
    "model.remat": lm_config.REMAT_POLICIES,
    "data.tokenizer": lm_config.TOKENIZERS,
    "train.optimizer": lm_config.OPTIMIZERS,
    "train.schedule": lm_config.SCHEDULES,
}


def declared_keys() -> dict[str, object]:
  """{"section.key": default} of configs/base.py."""
  c = base.get_config()
  return {f"{section}.{key}": value for section in c.keys() for key, value in c[section].items()}


def mentioned_keys(text: str) -> set[str]:
  return {f"{section}.{key}" for section, key in MENTION.findall(text) if key != "py"}


def table_rows(text: str) -> dict[str, dict]:
  """{"section.key": {"heading", "type", "default", "allowed", "what"}} of the reference's table rows."""
  rows, heading = {}, None
  for line in text.splitlines():
    if match := HEADING.match(line):
      heading = match.group(1)
    elif match := ROW.match(line):
      section, key, rest = match.groups()
      name = f"{section}.{key}"
      assert name not in rows, f"{name} has two rows"
      cells = [cell.strip() for cell in rest.split("|")]
      assert len(cells) == 4, f"{name}: expected type | default | allowed | what, got {cells}"
      rows[name] = dict(zip(("type", "default", "allowed", "what"), cells), heading=heading)
  return rows


def drift(text: str, declared) -> tuple[list[str], list[str]]:
  """(keys without a row, keys named that do not exist)."""
  return sorted(set(declared) - set(table_rows(text))), sorted(mentioned_keys(text) - set(declared))


@pytest.fixture(scope="module")
def reference() -> str:
  with open(REFERENCE) as f:
    return f.read()


def test_every_declared_key_has_a_row_and_every_named_key_exists(reference):
  declared = declared_keys()
  assert len(declared) > 40  # the parse of base.py itself found the keys
  assert len(table_rows(reference)) > 40 and len(mentioned_keys(reference)) > 40
  missing, unknown = drift(reference, declared)
  assert not missing, f"keys of configs/base.py missing from docs/configuration.md: {missing}"
  assert not unknown, f"docs/configuration.md names keys that configs/base.py does not declare: {unknown}"


@pytest.mark.parametrize("path", [GUIDE, os.path.join(ROOT, "README.md")], ids=os.path.basename)
def test_other_docs_name_only_existing_keys(path):
  with open(path) as f:
    text = f.read()
  assert mentioned_keys(text), f"{path} names no key: has the parser broken?"
  assert not mentioned_keys(text) - set(declared_keys())


def test_rows_sit_in_their_section(reference):
  rows = table_rows(reference)
  assert {name: row["heading"] for name, row in rows.items()} == {name: name.split(".")[0] for name in rows}
  assert all(row["what"] for row in rows.values())


def test_types_and_defaults_are_those_of_base(reference):
  for name, row in table_rows(reference).items():
    default = declared_keys()[name]
    assert row["type"] == type(default).__name__, name
    if isinstance(default, ml_collections.ConfigDict):  # data.sources: its keys have their own rows
      continue
    written = ast.literal_eval(row["default"].strip("`"))
    assert type(written) is type(default) and written == default, f"{name}: {row['default']} != {default!r}"


def test_every_source_key_has_a_row(reference):
  for key, default in base.source().items():
    match = re.search(rf"^\| `data\.sources\.<name>\.{key}` \| (\w+) \| `([^`]*)` \|", reference, re.M)
    assert match, key
    assert match.group(1) == type(default).__name__ and ast.literal_eval(match.group(2)) == default, key


def test_choices_are_those_that_validate_accepts(reference):
  rows = table_rows(reference)
  for name, allowed in CHOICES.items():
    assert set(re.findall(r"`([^`]+)`", rows[name]["allowed"])) == set(allowed), name
  for name, default in declared_keys().items():
    if isinstance(default, bool):
      assert rows[name]["allowed"] == "`True`, `False`", name


def test_the_check_fails_on_drift():
  declared = {"model.d_model": 1, "train.seed": 0}
  good = ("## model\n| `model.d_model` | int | `1` | > 0 | x |\n"
          "## train\n| `train.seed` | int | `0` | any | y |\n")
  assert drift(good, declared) == ([], [])
  assert drift(good.replace("`train.seed`", "`train.seeds`"), declared) == (["train.seed"], ["train.seeds"])
  assert drift(good + "Set --config.train.sede=1 (see lm/training/train.py, train.py, lm.training.train.run).", declared) == (
      [], ["train.sede"])


def test_the_guide_explains_the_lines_the_run_prints():
  from lm.data.batching import BatchPlan  # imports jax: only this test pays for it

  with open(GUIDE) as f:
    guide = f.read()
  for line in BatchPlan(micro_batch_size=8, accumulation_steps=64, data_parallel=8, seq_len=2048).describe():
    label, value = line if isinstance(line, tuple) else line.split(": ", 1)
    assert re.search(rf"^{re.escape(label)}:\s+{re.escape(value)}$", guide, re.MULTILINE), line
  assert "performance.md#micro-batch--accumulation-choices-by-memory-size" in guide
