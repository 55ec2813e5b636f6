import dataclasses
import glob
import importlib.util
import json
import os

import ml_collections
import pytest

from configs import base
from lm.config import Config, from_config_dict
from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]


def _load(path, *args) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def _import_dir(directory, **model) -> str:
  """What scripts/convert_hf.py import writes, but the parameters: model.json and a tokenizer file."""
  directory.mkdir()
  fields = {**base.get_config().model.to_dict(), "num_layers": 2, "d_model": 64, **model}
  (directory / "model.json").write_text(json.dumps({"model": fields, "source": "test"}))
  (directory / "tokenizer.json").write_text("{}")
  return str(directory)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_converts_and_validates(path, tmp_path):
  args = [_import_dir(tmp_path / "import")] if os.path.basename(path).startswith("imported") else []
  config = from_config_dict(_load(path, *args))
  assert isinstance(config, Config)


def test_an_import_is_a_config_of_its_model_tokenizer_and_weights(tmp_path):
  directory = _import_dir(tmp_path / "smollm2", max_seq_len=1024, norm_eps=9.999999747378752e-06)
  config = from_config_dict(_load(os.path.join(ROOT, "configs", "imported.py"), directory))
  assert (config.model.num_layers, config.model.d_model, config.model.norm_eps) == (2, 64, 9.999999747378752e-06)
  assert (config.data.tokenizer, config.data.tokenizer_path) == ("huggingface", f"{directory}/tokenizer.json")
  assert config.train.init_from == directory and config.train.seq_len == 1024  # base's 2048, capped
  assert config.train.learning_rate == 1e-4  # base.continued_training's
  with pytest.raises(ValueError, match="holds no model.json"):
    _load(os.path.join(ROOT, "configs", "imported.py"), str(tmp_path))
  with pytest.raises(ValueError, match="name the import's directory after a colon"):
    _load(os.path.join(ROOT, "configs", "imported.py"))


def test_model_floats_agree_within_a_relative_tolerance():
  from lm.checkpoints.param_files import check_same_model
  from lm.config import same_setting

  assert same_setting(1e-5, 9.999999747378752e-06) and not same_setting(1e-5, 1.1e-5)
  assert same_setting([1.0, "a"], (1.0000001, "a")) and not same_setting("silu", "gelu")
  model = base.get_config().model.to_dict()
  check_same_model({**model, "norm_eps": 9.999999747378752e-06}, {**model, "norm_eps": 1e-5}, "ckpt")
  with pytest.raises(ConfigError, match="model.norm_eps = 1e-06 there, 1e-05 here"):
    check_same_model({**model, "norm_eps": 1e-6}, {**model, "norm_eps": 1e-5}, "ckpt")


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if not p.endswith("base.py")], ids=os.path.basename)
def test_config_files_have_a_docstring_with_their_command(path):
  with open(path) as f:
    source = f.read()
  assert source.startswith('"""') and f"--config=configs/{os.path.basename(path)}" in source


def test_base_declares_exactly_the_dataclass_fields():
  c = base.get_config()
  for section in ("model", "data", "train", "mesh"):
    fields = {f.name for f in dataclasses.fields(type(getattr(from_config_dict(c), section)))}
    assert set(c[section].keys()) == fields


def _with(section, key, value):
  # A plain dict round trip: a config written without base.get_config() has no type safety.
  d = base.get_config().to_dict()
  d[section][key] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("section,key,value,expected", [
    ("model", "num_kv_heads", 5, "config.model.num_heads = 16 is not divisible by config.model.num_kv_heads = 5"),
    ("train", "optimizer", "sgd", "config.train.optimizer = 'sgd' is not known; choose one of adamw, lion"),
    ("train", "seq_len", 8192, "config.train.seq_len = 8192 is over config.model.max_seq_len = 4096"),
    ("train", "micro_batch_size", 0, "config.train.micro_batch_size = 0 must be > 0"),
    ("train", "save_interval_steps", -5, "config.train.save_interval_steps = -5 must be > 0"),
    ("train", "num_epochs", 2, "set exactly one of them"),
    ("model", "remat", "some", "config.model.remat = 'some' is not known"),
    ("mesh", "fsdp", -1, "at most one may be -1"),
    ("train", "learning_rate", "fast", "config.train.learning_rate = 'fast' is a str; it must be a float"),
    ("model", "vocab_size", 10**12, "config.model.vocab_size = 1,000,000,000,000 is over 2,147,483,647, the most "
                                    "ids the model holds (token ids are int32"),
    ("model", "max_seq_len", 10**12, "config.model.max_seq_len = 1,000,000,000,000 is over 2,147,483,647, the "
                                     "longest sequence the model can number"),
])
def test_bad_values_name_the_key(section, key, value, expected):
  with pytest.raises(ConfigError) as e:
    from_config_dict(_with(section, key, value))
  assert expected in str(e.value)


def test_unknown_key_is_rejected():
  c = base.get_config()
  with c.unlocked():
    c.train.micro_batch = 4
  with pytest.raises(ConfigError, match=r"unknown keys \['micro_batch'\]"):
    from_config_dict(c)


def _with_source(**changes):
  c = base.get_config()
  c.data.sources.main = base.source(**changes)
  return c


@pytest.mark.parametrize("changes,expected", [
    ({"train_split": "train[:50%]"}, "config.data.sources.main.train_split = 'train[:50%]' does nothing for a "
                                     "text_files source (its kind): only tfds sources read train_split. Remove the "
                                     "override (its default is 'train')"),
    ({"kind": "jsonl", "path": "a.jsonl", "separator": "<END>"},
     "config.data.sources.main.separator = '<END>' does nothing for a jsonl source (its kind): only text sources"),
    ({"kind": "text", "path": "a.txt", "text_field": "body"},
     "text_field = 'body' does nothing for a text source (its kind): only jsonl and parquet and tfds sources"),
    ({"validation_fraction": 0.0}, "config.data.sources.main.validation_fraction = 0.0 must be in (0, 1)"),
    ({"validation": "val.txt", "validation_fraction": 1.0}, "validation_fraction = 1.0 must be in [0, 1) (unused"),
])
def test_source_keys_that_do_nothing_or_are_out_of_range_are_refused(changes, expected):
  with pytest.raises(ConfigError) as e:
    from_config_dict(_with_source(**changes))
  assert expected in str(e.value)


def test_keys_a_kind_reads_and_an_unused_validation_fraction_are_accepted():
  from lm import config as lm_config
  for key, (_, default) in lm_config.KIND_KEYS.items():  # the defaults every kind accepts are base.source()'s
    assert base.source()[key] == default
  for changes in ({"kind": "tfds", "path": "d", "train_split": "train[:50%]", "text_field": "body"},
                  {"kind": "text", "path": "a.txt", "separator": "<END>"},
                  {"kind": "parquet", "path": "a.parquet", "text_field": "body"},
                  {"validation": "val.txt", "validation_fraction": 0.0}):  # named files: the fraction is unused
    from_config_dict(_with_source(**changes))
