"""What XLA compiled: the collectives one call of a compiled program runs, read from its HLO text, and the
memory it holds on each device.

A collective inside a while loop runs once per iteration: the loops of a train step (the scan over
micro-batches, the scans over layers in the forward and backward passes) carry XLA's
`known_trip_count` (or, on TPU, a constant bound in their condition), and each collective is counted that
many times, nested loops multiplied.
Bytes are those of each collective's result on one device (for an all-gather the gathered array, for a
reduce-scatter the scattered shard), summed over its runs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][a-z\-]*)\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  count: int  # runs per call of the program
  bytes: int  # result bytes per device, summed over the runs


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """{name: instruction lines} of an HLO module's text, and the entry computation's name. A computation
  ends at a line that is a lone "}": an instruction's backend_config may span lines (XLA:TPU's Mosaic
  kernels, splash attention among them, write theirs with newlines), one of which can begin with "}}"."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(" "):
      current = match.group(1)
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line.rstrip() == "}":
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations, entry


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
  """Iterations of the while loop on `line`: XLA's `known_trip_count` (CPU, GPU), else read from its
  condition (XLA:TPU writes none): `i < N` with N a constant, the induction variable starting at 0 and
  stepping by 1 as jax's scans lower. 1 when neither is found."""
  trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  if trips:
    return int(trips.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line)
  lines = computations.get(condition.group(1), []) if condition else []
  constants = dict(re.findall(r"%?([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(lines)))
  for body_line in lines:
    compare = re.search(r"compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT", body_line)
    if compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return 1


def collectives(hlo_text: str) -> dict[str, Collective]:
  """{kind: Collective} of one call of the program whose optimized HLO text (`compiled.as_text()`) is
  given; kinds that do not occur are left out.

  XLA:TPU places collectives inside fusions (asynchronous collective fusions that overlap them with
  matmuls), where one collective can appear twice (its start and the fusion that consumes it) under one
  channel id: within one run of a computation a channel id is counted in one computation only (the first
  that names it). Within one computation every instruction counts: jax's shard_map collectives can share
  a channel id there (XLA:TPU numbers the all-to-alls of a manual region alike)."""
  computations, entry = _computations(hlo_text)
  counts, sizes = collections.Counter(), collections.Counter()

  def visit(name: str, runs: int, seen: dict) -> None:
    for line in computations.get(name, ()):
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op = match.groups()
      kind = op.removesuffix("-start")
      if kind in KINDS and not op.endswith("-done"):
        channel = re.search(r"channel_id=(\d+)", line)
        if channel and seen.setdefault(channel.group(1), name) != name:
          continue
        counts[kind] += runs
        arrays = _ARRAY.findall(shape)
        if op.endswith("-start") and shape.startswith("(") and len(arrays) > 1:
          arrays = arrays[1:2]  # an asynchronous start's tuple: (operand, result, context...)
        sizes[kind] += runs * sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                                  for d, dims in arrays)
      elif op == "while":
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        visit(body, runs * _trip_count(line, computations), {})
      elif op in ("call", "conditional", "async-start", "fusion"):
        for called in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-, %]+)\}?", line):
          for callee in called.replace("%", "").split(", "):
            visit(callee.strip(), runs, seen)

  visit(entry, 1, {})
  return {kind: Collective(kind, counts[kind], sizes[kind]) for kind in KINDS if counts[kind]}


def describe(found: dict[str, Collective]) -> str:
  """`all-reduce 12 x (3.1 MB), all-gather 16 x (45.0 MB)`, or `none`."""
  return ", ".join(f"{c.kind} {c.count} x ({c.bytes / 1e6:,.1f} MB)" for c in found.values()) or "none"


def live_bytes(compiled) -> int:
  """Bytes one device holds while a call of `compiled` runs, by XLA's memory analysis: its arguments, its
  outputs not aliased to them (a donated state's buffers are reused) and its temporaries."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)
