"""One training per workdir: a lease file, `<workdir>/lease.json`, held by the training process.

A file with a heartbeat rather than an OS lock, so that it works on gs:// and on shared file systems,
where locks are unreliable or missing. The holder writes {host, pid, started, heartbeat, token} at startup
and refreshes `heartbeat` every HEARTBEAT_SECONDS from a daemon thread; it deletes the file at exit.

A second training on the workdir stops at startup, naming the holder, while the lease is live. A lease is
stale, and taken over with a warning, when its process is gone (same host: the pid no longer runs) or its
heartbeat is older than STALE_SECONDS (a host that died). Two trainings starting at the same moment both
write; each reads the file back before its first step (`confirm`, seconds later: after compiling) and only
the one whose token it holds goes on, the other stops before writing anything of its own. A holder
that finds its lease taken (it stalled past STALE_SECONDS) stops at its next step. Eval and sampling read
checkpoints and take no lease. With several processes, process 0 holds it for the run.

The preparation of a source takes the same lease on the directory it prepares (lm/data/corpus.py): a second
preparation of it waits for the first and uses its result.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from lm import console
from lm.errors import ConfigError, TrainingError

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class Lease:
  """Context manager: acquires the lease of `workdir` (ConfigError when another training holds it)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = epath.Path(workdir) / "lease.json"
    self.enabled, self.lost = enabled, False
    self._mine = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> Lease:
    if self.enabled:
      self._refuse_if_held()
      self._write()
    return self

  def confirm(self) -> None:
    """Before the first step: the lease is still ours (no other training started at the same moment and
    wrote after us); then the heartbeat starts."""
    if self.enabled and self._thread is None:
      self._refuse_if_held()
      self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
      self._thread.start()

  def __exit__(self, *exc) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=5)
    if self.enabled and self._read().get("token") == self._mine["token"]:
      self.path.unlink(missing_ok=True)

  def check(self) -> None:
    """Stops the run (TrainingError) when another training took the lease over."""
    if self.lost:
      raise TrainingError(
          f"Another training took over {self.path} (this process stalled past {STALE_SECONDS:.0f} s without "
          "a heartbeat): stopped so that two runs do not write one workdir. The checkpoints are the newest "
          "run's now.")

  def _read(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):  # none, or half-written by a process that died writing it
      return {}

  def _write(self) -> None:
    self.path.write_text(json.dumps({**self._mine, "heartbeat": time.time()}))

  def holder(self) -> dict | None:
    """The lease of another live process ({host, pid, started, heartbeat, ...}), or None: there is none, it
    is ours, or it is stale (to be taken over, said in a warning)."""
    held = self._read()
    if not held or held.get("token") == self._mine["token"]:
      return None
    age = time.time() - float(held.get("heartbeat", 0))
    same_host = held.get("host") == self._mine["host"]
    if same_host and not _alive(int(held.get("pid", -1))):
      reason = f"its process (pid {held.get('pid')}) is gone"
    elif age > STALE_SECONDS:
      reason = f"its last heartbeat was {age:.0f} s ago"
    else:
      return {**held, "age": age}
    console.logger.warning("Taking over the lease of %s from host %s, pid %s (started %s): %s.", self.path,
                           held.get("host"), held.get("pid"), held.get("started"), reason)
    return None

  def _refuse_if_held(self) -> None:
    held = self.holder()
    if held is not None:
      raise ConfigError(
          f"--workdir is in use by another training: host {held.get('host')}, pid {held.get('pid')}, started "
          f"{held.get('started')} (heartbeat {held['age']:.0f} s ago, {self.path}). Two runs on one workdir would "
          "replace each other's checkpoints. Stop that run first, or use another --workdir; a lease whose "
          f"process is gone or whose heartbeat is over {STALE_SECONDS:.0f} s old is taken over by itself.")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if self._read().get("token") != self._mine["token"]:
          self.lost = True
          return
        self._write()
      except OSError as e:  # a failed refresh is retried; a lease that goes stale is the cost
        console.logger.warning("Refreshing %s failed: %s", self.path, e)
