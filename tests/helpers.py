"""Small configs shared by the tests, and the XLA flags every test process runs with."""

import dataclasses
import functools
import importlib.util
import os
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


# libtpu's and jax's CUDA plugin's wheels exist for Linux x86_64 alone (the plugin's as scripts/install.sh
# installs it): there the install must put them beside .venv, and a test that needs one fails when it is
# missing (an install that failed must not pass as a skipped test).
LIBTPU_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"


def _needs(installed: bool, what: str, where: str, lock: str):
  """A decorator: the test as it is where `what` is installed; failing where it should be and is not;
  skipped elsewhere."""
  def decorate(test):
    if installed:
      return test
    if not LIBTPU_PLATFORM:
      return pytest.mark.skip(reason=f"{what} has no wheels for {platform.system()} {platform.machine()}")(test)

    @functools.wraps(test)
    def missing(*args, **kwargs):
      pytest.fail(f"{what} is not installed in {where}, though this platform has its wheels: "
                  f"run `bash scripts/install.sh` ({lock}) and see why it failed.")
    return missing
  return decorate


def needs_libtpu(test):
  """XLA:TPU (libtpu, installed beside .venv by scripts/install.sh) compiling for a slice that is not here."""
  from lm.tools.topology import library_path  # noqa: PLC0415 (lm.tools.topology imports no jax)
  return _needs(library_path() is not None, "libtpu", ".venv-libtpu", "requirements/libtpu.txt")(test)


def needs_cuda_plugin(test):
  """XLA:GPU (jax's CUDA plugin, installed beside .venv by scripts/install.sh) compiling for GPUs that are not
  here."""
  from lm.tools.topology import cuda_plugin_installed  # noqa: PLC0415
  return _needs(cuda_plugin_installed(), "jax's CUDA plugin", ".venv-cuda", "requirements/cuda.txt")(test)


@functools.cache
def load_script(name: str):
  """scripts/NAME.py as a module (its absl flags defined, its main not run); once per process, as absl's
  flags can be defined once."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
