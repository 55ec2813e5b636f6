"""A TPU slice that is not here: its devices, for XLA:TPU to compile for on a CPU host, and its chips' figures.

libtpu (the `libtpu` wheel, which `scripts/install.sh` puts in `.venv-libtpu/`, outside the virtual
environment) holds XLA:TPU. Installed as a package, it would make every `import jax` on a machine without
a TPU print initialisation errors; beside the environment it is loaded only here, on request, through
`TPU_LIBRARY_PATH`. Compile-only devices cannot run anything: create PRNG keys and concrete arrays on the
CPU, and lower and compile on a mesh of these (`jit(f).lower(abstract args).compile()`).

  devices("v5e:2x4")               8 chips of one v5e slice (2 hosts of 4)
  devices("v5p:2x2x2", slices=2)   two v5p-16 slices joined over the data-centre network
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
LIBTPU = os.path.join(ROOT, ".venv-libtpu", "libtpu", "libtpu.so")
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's published figures (Cloud TPU system architecture pages)."""
  name: str
  hbm_bytes: float  # decimal GB, as Google quotes them; the runtime keeps some for itself
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


# By `device.device_kind` of the topology's devices.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GB, 918e12, 1640e9),
}
EXAMPLES = "v5e:2x4 (v5e-8), v5e:4x4, v5p:2x2x1 (v5p-8), v5p:2x2x4, v4:2x2x2, v6e:2x4"


def library_path() -> str | None:
  """libtpu.so: $TPU_LIBRARY_PATH, else the one scripts/install.sh put beside the environment, else an
  installed `libtpu` package's."""
  for path in (os.environ.get("TPU_LIBRARY_PATH"), LIBTPU):
    if path and os.path.isfile(path):
      return path
  try:
    import libtpu  # noqa: F401  (only where it was installed as a package)
    return libtpu.get_library_path()
  except ImportError:
    return None


def devices(topology: str, slices: int = 1) -> list:
  """Compile-only devices of `slices` slices of `topology` (libtpu's names: "v5e:2x4", "v5p:2x2x1").
  ConfigError naming --topology when libtpu is missing or does not know the topology."""
  path = library_path()
  if path is None:
    raise ConfigError(
        "--topology needs libtpu (XLA:TPU), which is not installed: run `bash scripts/install.sh` (it puts the "
        f"wheel in {os.path.dirname(os.path.dirname(LIBTPU))}), or point TPU_LIBRARY_PATH at a libtpu.so.")
  if slices < 1:
    raise ConfigError(f"--num_slices = {slices} must be >= 1.")
  os.environ["TPU_LIBRARY_PATH"] = path
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
  # Compile-only: never takes a chip, so several plans (or a plan beside a training on a TPU VM) may load
  # libtpu at once, which its lock file would otherwise refuse.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    with _quiet_stderr():  # libtpu reports the missing TPU VM environment on initialisation
      found = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=slices).devices
  except Exception as error:  # libtpu's JaxRuntimeError: INVALID_ARGUMENT with its reason
    raise ConfigError(
        f"--topology={topology} (--num_slices={slices}): libtpu cannot make this slice: "
        f"{str(error).splitlines()[0]}. Give a TPU generation and chip grid libtpu knows, e.g. {EXAMPLES}.") from None
  kind = found[0].device_kind
  if kind not in CHIPS:
    raise ConfigError(f"--topology={topology}: chips of kind {kind!r} have no figures in lm/tools/topology.py CHIPS; "
                      f"add them, or use one of {', '.join(c.name for c in CHIPS.values())}.")
  return list(found)


def chip(device) -> Chip:
  return CHIPS[device.device_kind]


@contextlib.contextmanager
def _quiet_stderr():
  """File descriptor 2 sent to /dev/null for the duration (libtpu writes there from C++)."""
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)
