"""What changed between two sets of locks: `python scripts/lock_diff.py OLD_DIR NEW_DIR` (scripts/lock.sh).

One line per package whose pinned version moved, was added or was removed, per lock file."""

import os
import re
import sys

# A lock's requirement line: name==version, then its environment marker (uv's universal locks), then "\".
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(path: str) -> dict[str, str]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {m.group(1).lower(): m.group(2) for m in map(PIN.match, f) if m}


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
  lines = []
  for name in sorted(old.keys() | new.keys()):
    if name not in new:
      lines.append(f"  - {name} {old[name]}")
    elif name not in old:
      lines.append(f"  + {name} {new[name]}")
    elif old[name] != new[name]:
      lines.append(f"    {name} {old[name]} -> {new[name]}")
  return lines


def main(old_dir: str, new_dir: str) -> None:
  for name in sorted(f for f in os.listdir(new_dir) if f.endswith(".txt")):
    lines = changes(pins(os.path.join(old_dir, name)), pins(os.path.join(new_dir, name)))
    print(f"requirements/{name}: " + ("unchanged" if not lines else f"{len(lines)} changed"))
    print("\n".join(lines)) if lines else None


if __name__ == "__main__":
  main(*sys.argv[1:])
