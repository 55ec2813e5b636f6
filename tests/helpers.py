"""Small configs shared by the tests, and the XLA flags every test process runs with."""

import dataclasses
import functools
import platform

import ml_collections
import pytest

from configs import base
from lm.config import Config, MeshConfig, from_config_dict

# Tests compile far more than they run, and LLVM's optimisations take a third of a tiny run's time. The
# results stay deterministic (and the comparisons of the tests are between runs with the same flags);
# the benchmark and the planner, which measure, run without it.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def base_config() -> Config:
  return from_config_dict(base.get_config())


def tiny_model(**overrides):
  """A 2-layer model small enough to compile in a second."""
  fields = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                mlp_dim=64, max_seq_len=64)
  fields.update(overrides)
  return dataclasses.replace(base_config().model, **fields)


def mesh_config(**sizes) -> MeshConfig:
  """The base mesh (data parallel across hosts) with some axis sizes changed."""
  return dataclasses.replace(base_config().mesh, **sizes)


def apply_overrides(c: ml_collections.ConfigDict, flags) -> ml_collections.ConfigDict:
  """`--config.a.b=value` command-line overrides applied to c, as main.py's flags would (typed by the
  value they replace); other arguments are skipped."""
  for flag in flags:
    if flag.startswith("--config."):
      key, value = flag[len("--config."):].split("=", 1)
      *sections, name = key.split(".")
      section = functools.reduce(lambda part, s: part[s], sections, c)
      old = section[name]
      section[name] = (value == "True") if isinstance(old, bool) else type(old)(value)
  return c


# libtpu's wheels exist for Linux x86_64 alone: there scripts/install.sh must install it, and a test that
# needs it fails when it is missing (an install that failed must not pass as a skipped test).
LIBTPU_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"


def needs_libtpu(test):
  """XLA:TPU (libtpu, installed beside .venv by scripts/install.sh) compiling for a slice that is not here:
  the test as it is where libtpu is installed; failing where it should be and is not; skipped elsewhere."""
  from lm.tools.topology import library_path  # noqa: PLC0415 (lm.tools.topology imports no jax)
  if library_path() is not None:
    return test
  if not LIBTPU_PLATFORM:
    return pytest.mark.skip(reason=f"libtpu has no wheels for {platform.system()} {platform.machine()}")(test)

  @functools.wraps(test)
  def missing(*args, **kwargs):
    pytest.fail("libtpu is not installed in .venv-libtpu, though this platform has its wheels: "
                "run `bash scripts/install.sh` (requirements/libtpu.txt) and see why it failed.")
  return missing


def needs_cuda_plugin(test):
  """XLA:GPU (jax's CUDA plugin, installed beside .venv by scripts/install.sh) compiling for GPUs that are not
  here: the test as it is where the plugin is installed; failing where it should be and is not (Linux x86_64,
  as libtpu); skipped elsewhere."""
  from lm.tools.topology import cuda_plugin_installed  # noqa: PLC0415
  if cuda_plugin_installed():
    return test
  if not LIBTPU_PLATFORM:
    return pytest.mark.skip(reason=f"no CUDA plugin is installed for {platform.system()} {platform.machine()}")(test)

  @functools.wraps(test)
  def missing(*args, **kwargs):
    pytest.fail("jax's CUDA plugin is not installed in .venv-cuda, though this platform has its wheels: "
                "run `bash scripts/install.sh` (requirements/cuda.txt) and see why it failed.")
  return missing
