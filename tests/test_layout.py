"""The README's Layout is the architecture: it lists every module of lm/ once, each below every module it
imports (at the top of the file or inside a function), so that no module imports one that builds on it.
And one import path per concept: ConfigError from lm.errors, the remote-path test from lm.storage."""

import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> list[str]:
  """Every module of lm/ (git's files), as dotted names."""
  files = subprocess.run(["git", "ls-files", "lm"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  return sorted(f[:-3].replace("/", ".") for f in files.split() if f.endswith(".py") and not f.endswith("__init__.py"))


def _layout() -> list[str]:
  """The modules the README's Layout lists, in its order."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  block = readme.split("## Layout", 1)[1].split("```")[1]
  return [m[:-3].replace("/", ".") for m in re.findall(r"^(lm/\S+\.py)\s", block, re.M)]


def _imports(module: str, known: set[str]) -> set[str]:
  """The lm modules `module` imports anywhere in its file."""
  tree = ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py")).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lm" and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split(".")[0] == "lm"}
  return {m for m in found if m in known} - {module}


def test_the_layout_lists_every_module_once_below_what_it_imports():
  modules, listed = _modules(), _layout()
  assert sorted(listed) == modules, (set(modules) ^ set(listed))
  above: set[str] = set()
  wrong = []
  for module in listed:
    wrong += [f"{module} imports {m}, listed below it" for m in sorted(_imports(module, set(modules)) - above)]
    above.add(module)
  assert not wrong, "\n".join(wrong)


def test_one_import_path_per_concept():
  """ConfigError is imported from lm.errors only; "://" is tested in lm.storage only."""
  offenders = []
  for folder in ("lm", "scripts", "tests", "configs"):
    for path, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in (n for n in names if n.endswith(".py")):
        file = os.path.join(path, name)
        text = open(file).read()
        for node in ast.walk(ast.parse(text)):
          if (isinstance(node, ast.ImportFrom) and node.module not in ("lm.errors", None)
              and "ConfigError" in [a.name for a in node.names]):
            offenders.append(f"{file}: ConfigError from {node.module}")
        if (os.path.relpath(file, ROOT).startswith("lm/") and not file.endswith("storage.py")
            and re.search(r'"://" (not )?in ', text)):
          offenders.append(f"{file}: tests for a remote path itself (use lm.storage.is_remote)")
  assert not offenders, "\n".join(offenders)
