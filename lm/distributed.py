"""Several processes, one per host: whether to start JAX's multi-controller runtime, and the checks that
turn a wrongly launched cluster into an error within a bounded time instead of a hang.

JAX finds its peers by itself on Cloud TPU, under SLURM (`srun`) and under Open MPI (`mpirun`):
`jax.distributed.initialize()` without arguments. Other clusters pass --coordinator_address,
--num_processes and --process_id to main.py. A single process starts nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import socket
import sys
import threading
from typing import Mapping

from lm.errors import ConfigError

# The variables JAX's SLURM detection reads; `srun` sets them all, a batch script alone does not.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the others; a None field is left to JAX's cluster detection."""
  source: str  # what says there are several processes: "flags", "SLURM (16 tasks)", "Cloud TPU", ...
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def describe(self) -> str:
    if self.source == "flags":
      return f"--coordinator_address={self.coordinator_address} --num_processes={self.num_processes}"
    return f"detected by JAX ({self.source})"


def detect(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
           environ: Mapping[str, str] = os.environ) -> Launch | None:
  """The multi-process launch this process belongs to, or None when it runs alone.

  The flags win over the environment; --num_processes=1 alone runs one process wherever it is.
  """
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
    return None
  if any(value is not None for value in given.values()):
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise ConfigError(
          f"{' and '.join(missing)} missing: a cluster that JAX does not detect needs all three of "
          "--coordinator_address (host:port of process 0, the same on every process), --num_processes and "
          "--process_id (0 to num_processes - 1, one per process).")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} with --num_processes={num_processes}: the process ids "
                        "are 0 to num_processes - 1.")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator_address={coordinator_address!r} must be host:port of process 0, "
                        "e.g. 10.0.0.2:8476.")
    return Launch("flags", coordinator_address, num_processes, process_id)
  if all(name in environ for name in _SLURM) and _count(environ["SLURM_NTASKS"]) > 1:
    return Launch(f"SLURM, {environ['SLURM_NTASKS']} tasks")
  if _count(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return Launch(f"Open MPI, {environ['OMPI_COMM_WORLD_SIZE']} ranks")
  # jax[tpu] installs libtpu; JAX reads the slice's hosts from the TPU VM's metadata (GKE: the variable).
  if "TPU_WORKER_HOSTNAMES" in environ or importlib.util.find_spec("libtpu") is not None:
    return Launch("Cloud TPU")
  return None


def _count(value: str) -> int:
  return int(value) if value.isdigit() else 1


def initialize(launch: Launch, timeout_seconds: int) -> None:
  """Starts jax.distributed (before anything touches a device) and checks the processes agree; stops the
  process with exit code 2 and a message if they have not all joined within `timeout_seconds`."""
  import jax  # pylint: disable=import-outside-toplevel

  # Collectives between CPU devices of different processes; TPU and GPU use their own links (ICI, NCCL).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's own timeout aborts the process with a fatal log line; the watchdog speaks first.
  watchdog = threading.Timer(timeout_seconds, _give_up, (launch, timeout_seconds))
  watchdog.daemon = True
  watchdog.start()
  try:
    try:
      jax.distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id,
                                 initialization_timeout=timeout_seconds + 60)
    except (RuntimeError, ValueError) as e:  # JAX's cluster detection and connection failures
      raise ConfigError(f"jax.distributed.initialize failed ({launch.describe()}): {e}. Outside a cluster "
                        "that JAX detects, pass --coordinator_address, --num_processes and --process_id, or "
                        "--num_processes=1 to run one process.") from e
    check_devices(jax.devices())
    check_process_count(launch.num_processes or jax.process_count())
  finally:
    watchdog.cancel()


def _give_up(launch: Launch, timeout_seconds: int) -> None:
  """Runs on the watchdog's thread: the main thread is blocked inside JAX, so exit from here."""
  address = launch.coordinator_address
  probe = ""
  if address and launch.process_id:
    host, _, port = address.rpartition(":")
    try:
      socket.create_connection((host, int(port)), timeout=2).close()
      probe = f" The coordinator {address} accepts connections, so some other process is missing or " \
              "was given another --num_processes."
    except OSError as e:
      probe = f" The coordinator {address} cannot be reached from here ({e}): is process 0 running, with " \
              "this address, and is the port open between the hosts?"
  if launch.source == "flags":
    which = f"process {launch.process_id} of {launch.num_processes}"
    fix = "Start every process with the same --coordinator_address and --num_processes and its own --process_id."
  else:
    which, fix = "this process", "Check that the job started main.py on every host."
  print(f"Configuration error: {which} ({launch.describe()}): not all processes joined within "
        f"{timeout_seconds} s (--distributed_timeout).{probe} {fix}", file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access  (no atexit: JAX's shutdown would wait for the others)


# How long an error exit of several processes waits for JAX's orderly shutdown (a barrier of every process).
EXIT_GRACE_SECONDS = 20


def exit_with(code: int, grace_seconds: float = EXIT_GRACE_SECONDS) -> None:
  """sys.exit(code); when several processes run, JAX's shutdown at exit waits for every other one, and one
  that is gone or stuck (measured: killed after joining) holds this one for ~100 s and then aborts it with a
  fatal log: leave with `code` after `grace_seconds` instead."""
  if "jax" in sys.modules and sys.modules["jax"].process_count() > 1:
    timer = threading.Timer(grace_seconds, _leave, (code, grace_seconds))
    timer.daemon = True  # it keeps running while the exit handlers wait
    timer.start()
  sys.exit(code)


def _leave(code: int, grace_seconds: float) -> None:
  print(f"(the other processes did not shut down within {grace_seconds:g} s; exiting with {code})",
        file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def check_devices(devices) -> None:
  """Every process must have the same number and kind of devices (JAX's multi-process rule)."""
  per_process = collections.Counter(d.process_index for d in devices)
  kinds = sorted({d.device_kind for d in devices})
  if len(set(per_process.values())) > 1 or len(kinds) > 1:
    counts = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
    raise ConfigError(
        f"The processes have different devices ({counts}; kinds {kinds}). Every host must bring the same "
        "number of devices of one kind: check CUDA_VISIBLE_DEVICES / JAX_LOCAL_DEVICE_IDS, "
        "--xla_force_host_platform_device_count, or that all TPU hosts belong to one slice type.")


def check_process_count(claimed: int) -> None:
  """All processes must have been started with the number of processes the coordinator counts."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  everyone = [int(n) for n in multihost_utils.process_allgather(np.int32(claimed))]
  if any(n != jax.process_count() for n in everyone):
    raise ConfigError(
        f"The processes were started with different --num_processes: {everyone} (process 0, 1, ...), and "
        f"{jax.process_count()} joined the coordinator. Give every process the same --num_processes.")


@contextlib.contextmanager
def process_zero_first():
  """Process 0 runs the block first (it may write caches: the prepared corpus, the tokenizer, packed
  arrays); the others run it once it is done, and find the caches on a shared disk."""
  import jax  # here: main.py imports this module before jax may start (XLA reads its flags then)
  from jax.experimental import multihost_utils

  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    multihost_utils.sync_global_devices("lm: process 0 prepared the data")
  try:
    yield
  finally:  # also on an error: the others then meet it themselves instead of waiting
    if several and jax.process_index() == 0:
      multihost_utils.sync_global_devices("lm: process 0 prepared the data")
