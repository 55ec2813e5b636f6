"""The locks (requirements/*.txt, made by scripts/lock.sh) hold what pyproject.toml asks for, and the
environments that scripts/install.sh made from them hold exactly the locked versions."""

import importlib.metadata
import json
import os
import subprocess
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.lock_diff import PIN
from tests.helpers import LIBTPU_PLATFORM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements")


def locked(name: str) -> dict[str, tuple[str, str | None]]:
  """{canonical name: (version, marker or None)} of requirements/<name>.txt."""
  with open(os.path.join(REQUIREMENTS, name)) as f:
    return {canonicalize_name(m.group(1)): (m.group(2), m.group(3)) for m in map(PIN.match, f) if m}


def applies(marker: str | None, environment: dict | None = None) -> bool:
  return marker is None or Requirement(f"x; {marker}").marker.evaluate(environment)


def test_every_requirement_of_pyproject_is_locked_within_its_range():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  pins = locked("main.txt")
  for line in project["dependencies"] + project["optional-dependencies"]["test"]:
    requirement = Requirement(line)
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{line} is not in requirements/main.txt: run `bash scripts/lock.sh`"
    assert requirement.specifier.contains(pins[name][0], prereleases=True), (
        f"requirements/main.txt locks {name}=={pins[name][0]} outside pyproject.toml's {line}: "
        "run `bash scripts/lock.sh`")


def test_jax_is_locked_at_its_pin_with_the_libtpu_its_tpu_extra_names():
  with open(os.path.join(REQUIREMENTS, "pins.in")) as f:
    pinned = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
  pins = locked("main.txt")
  assert pins["jax"][0] == pinned["jax"] and pins["jaxlib"][0] == pinned["jaxlib"]
  tpu_extra = [Requirement(r) for r in importlib.metadata.requires("jax")
               if r.startswith("libtpu") and "tpu" in r]
  libtpu = locked("libtpu.txt")["libtpu"][0]
  assert tpu_extra and all(r.specifier.contains(libtpu) for r in tpu_extra), (tpu_extra, libtpu)


def _differences(pins: dict, installed: dict, environment: dict | None = None) -> list[str]:
  return [f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
          for name, (version, marker) in sorted(pins.items())
          if applies(marker, environment) and installed.get(name) != version]


def test_the_environment_holds_exactly_the_locked_versions():
  installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
  assert not _differences(locked("main.txt"), installed), "run `bash scripts/install.sh`"


def test_the_transformers_environment_holds_exactly_the_locked_versions():
  python = os.path.join(ROOT, ".venv-hf", "bin", "python")
  assert os.path.exists(python), f"{python} is missing: run `bash scripts/install.sh`"
  script = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
  out = subprocess.run([python, "-c", script], capture_output=True, text=True, check=True).stdout
  installed = {canonicalize_name(name): version for name, version in json.loads(out).items()}
  assert not _differences(locked("hf.txt"), installed), "run `bash scripts/install.sh`"


@pytest.mark.skipif(not LIBTPU_PLATFORM, reason="libtpu has wheels for Linux x86_64 alone")
def test_libtpu_is_installed_at_the_locked_version():
  (record,) = [d for d in importlib.metadata.distributions(path=[os.path.join(ROOT, ".venv-libtpu")])
               if d.metadata["Name"] == "libtpu"] or [None]
  assert record is not None, ".venv-libtpu holds no libtpu: run `bash scripts/install.sh`"
  assert record.version == locked("libtpu.txt")["libtpu"][0]


def test_the_cuda_plugin_is_locked_at_the_locked_jax():
  """XLA:GPU for the planner is jax's own CUDA plugin: its version is jax's (the plugin refuses another)."""
  cuda, jax_version = locked("cuda.txt"), locked("main.txt")["jax"][0]
  assert cuda["jax-cuda12-plugin"][0] == cuda["jax-cuda12-pjrt"][0] == jax_version, (cuda, jax_version)


def test_maxtext_is_locked_at_the_projects_jax_and_libtpu():
  """scripts/benchmark_memory.py compares the two stacks' memory under one XLA:TPU: MaxText's lock holds the
  jax, jaxlib and libtpu of the project's."""
  maxtext, main = locked("maxtext.txt"), locked("main.txt")
  assert maxtext["maxtext"][0] == "0.2.5"
  assert (maxtext["jax"][0], maxtext["jaxlib"][0]) == (main["jax"][0], main["jaxlib"][0])
  assert maxtext["libtpu"][0] == locked("libtpu.txt")["libtpu"][0]


@pytest.mark.skipif(not LIBTPU_PLATFORM, reason="jax's CUDA plugin is installed on Linux x86_64 alone")
def test_the_cuda_plugin_is_installed_at_the_locked_version():
  installed = {canonicalize_name(d.metadata["Name"]): d.version
               for d in importlib.metadata.distributions(path=[os.path.join(ROOT, ".venv-cuda")])}
  assert not _differences(locked("cuda.txt"), installed), ".venv-cuda: run `bash scripts/install.sh`"


def test_a_marker_is_read_for_the_environment_it_names():
  linux = dict(default_environment(), sys_platform="linux")
  assert applies("sys_platform != 'win32'", linux) and not applies("sys_platform == 'win32'", linux)
  assert PIN.match("colorama==0.4.6 ; sys_platform == 'win32' \\").group(3) == "sys_platform == 'win32'"
