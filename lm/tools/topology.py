"""Accelerators that are not here: their devices, for XLA to compile for on a CPU host, and their figures.

TPU slices: libtpu (the `libtpu` wheel, which `scripts/install.sh` puts in `.venv-libtpu/`, outside the
virtual environment) holds XLA:TPU. Installed as a package, it would make every `import jax` on a machine
without a TPU print initialisation errors; beside the environment it is loaded only here, on request, through
`TPU_LIBRARY_PATH`.

GPU machines: XLA:GPU is jax's CUDA plugin (`jax-cuda12-plugin` and `jax-cuda12-pjrt` at the locked jax's
version, in `.venv-cuda/`, beside the environment for the same reason), loaded here on request. It compiles
without a GPU for a target config: XLA's own description of the card (`lm/tools/gpu_specs/*.txtpb`, from
XLA's `xla/backends/gpu/target_config/specs`), the machine given as hosts x GPUs per host.

Compile-only devices cannot run anything: create PRNG keys and concrete arrays on the CPU, and lower and
compile on a mesh of these (`jit(f).lower(abstract args).compile()`).

  devices("v5e:2x4")               8 chips of one v5e slice (2 hosts of 4)
  devices("v5p:2x2x2", slices=2)   two v5p-16 slices joined over the data-centre network
  devices("h100:8")                one host of 8 H100 SXM GPUs; "h100:2x8": two such hosts
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
LIBTPU = os.path.join(ROOT, ".venv-libtpu", "libtpu", "libtpu.so")
CUDA_PLUGIN = os.path.join(ROOT, ".venv-cuda")  # jax_plugins/xla_cuda12 and jax_cuda12_plugin
GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
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
    # NVIDIA's data sheets: dense bf16 tensor-core FLOP/s (the sparse figure halved), HBM and its bandwidth.
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 80 * GB, 989e12, 3350e9),
    "NVIDIA H200 141GB HBM3e": Chip("H200", 141 * GB, 989e12, 4800e9),
    "NVIDIA A100-SXM4-80GB": Chip("A100 SXM 80GB", 80 * GB, 312e12, 2039e9),
}
EXAMPLES = "v5e:2x4 (v5e-8), v5e:4x4, v5p:2x2x1 (v5p-8), v5p:2x2x4, v4:2x2x2, v6e:2x4, h100:8, h100:2x8, a100:8"
# --topology's GPU names: the target config (XLA's description of the card) in GPU_SPECS.
GPUS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}


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
  """Compile-only devices of `slices` slices of `topology` (libtpu's names: "v5e:2x4", "v5p:2x2x1"; or a
  GPU machine: "h100:8", "h100:2x8"). ConfigError naming --topology when XLA for it is missing or does not
  know the topology."""
  if topology.split(":")[0] in GPUS:
    return gpu_devices(topology, slices)
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


def cuda_plugin_installed() -> bool:
  """Whether scripts/install.sh put jax's CUDA plugin (XLA:GPU) in CUDA_PLUGIN."""
  return os.path.isdir(os.path.join(CUDA_PLUGIN, "jax_plugins", "xla_cuda12"))


def gpu_devices(topology: str, slices: int = 1) -> list:
  """Compile-only GPUs of `topology` ("h100:8": one host of 8; "h100:2x8": 2 hosts of 8), for XLA:GPU."""
  name, _, shape = topology.partition(":")
  hosts, _, per_host = shape.rpartition("x")
  if not per_host.isdigit() or not (hosts or "1").isdigit() or int(per_host) < 1 or int(hosts or 1) < 1:
    raise ConfigError(f"--topology={topology}: a GPU machine is {name}:GPUS (one host) or {name}:HOSTSxGPUS, "
                      f"e.g. {name}:8 or {name}:2x8.")
  if slices != 1:
    raise ConfigError(f"--topology={topology} --num_slices={slices}: GPU hosts are one network; give them in "
                      f"the topology ({name}:{slices}x{per_host}).")
  with open(os.path.join(GPU_SPECS, GPUS[name])) as f:
    target = f.read()
  from jax.experimental import topologies

  kwargs = dict(platform="cuda", target_config=target, topology=f"1x{hosts or 1}x{per_host}")
  try:
    found = topologies.get_topology_desc(**kwargs).devices
  except NotImplementedError:  # the plugin not loaded yet
    _load_cuda_plugin()
    found = topologies.get_topology_desc(**kwargs).devices
  _answer_cudnn_checks(target)
  return list(found)


def _load_cuda_plugin() -> None:
  """Registers jax's CUDA plugin from CUDA_PLUGIN (without initialising a GPU: JAX_PLATFORMS stays as set)."""
  import importlib
  import sys

  import jax

  if not cuda_plugin_installed():
    raise ConfigError(
        "--topology for GPUs needs XLA:GPU, jax's CUDA plugin, which is not installed: run "
        f"`bash scripts/install.sh` (Linux x86_64; it puts jax-cuda12-plugin in {CUDA_PLUGIN}).")
  from jax._src import xla_bridge  # noqa: PLC0415  (a plugin registered after jax started: no public API)

  jax.devices()  # jax finds its plugins once, when its backends start: before this directory is on the path
  sys.path.insert(0, CUDA_PLUGIN)
  # No CUDA libraries here to check the plugin against (JAX_PLATFORMS without cuda skips the check too).
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  importlib.import_module("jax_plugins.xla_cuda12").initialize()
  # What jax does for each plugin it finds at start: custom_partitioning's partitioner (cuDNN attention's
  # sharding) and the like, registered with the plugin.
  for callback in xla_bridge._plugin_callbacks:
    callback(c_api=xla_bridge._backend_factories["cuda"].c_api)


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


def _answer_cudnn_checks(target: str) -> None:
  """jax's cuDNN attention asks this machine, while it traces, for cuDNN's version and the GPU's compute
  capability (jax._src.cudnn.fused_attention_stablehlo); a machine without a GPU has neither, and XLA:GPU
  compiles the attention's custom calls without them. Where cuDNN is absent, the answers are the target's:
  the cuDNN the CUDA plugin was built against (the oldest it runs with) and the target config's capability."""
  import re

  from jax._src.cudnn import fused_attention_stablehlo as fused

  if fused.cuda_versions is not None:  # jax found the plugin at start: a GPU machine answers for itself
    return
  from jax_cuda12_plugin import _versions  # noqa: PLC0415  (on the path once the plugin is loaded)

  found = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?", target)
  capability = (int(found.group(1)), int(found.group(2) or 0))
  version = lambda text: tuple(int(x) for x in text.split("."))
  fused.check_cudnn_version = _versions.cudnn_build_version
  fused.check_compute_capability = lambda wanted: capability >= version(wanted)
  fused.is_cuda_compute_capability_equal = lambda wanted: capability == version(wanted)
