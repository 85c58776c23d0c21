"""The package's architecture, checked: module sizes, one-way imports between subpackages, and
the program convention (flags live in tools/ only). Reads the sources; imports nothing."""

import ast
import os
import re

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = os.path.join(_ROOT, "cmr_jax")
MAX_MODULE_LINES = 600
# What each part of the package may import (other parts of cmr_jax). Everything else is an
# upward import: e.g. a trainer importing an evaluator, or prediction importing a trainer.
ALLOWED = {
    "cpu_runtime": set(),
    "logs": {"cpu_runtime"},
    "losses": set(),
    "sharding": set(),
    "files": set(),
    "checkpoint": {"files"},
    "data": {"files"},
    "models": set(),
    "phantom": {"data"},
    "dicom": {"data"},
    "testing": {"data", "dicom", "phantom"},
    "convert": {"checkpoint", "data", "files", "models"},
    "runs": {"checkpoint", "convert", "data", "files", "models"},
    "inference": {"data", "models", "runs", "sharding"},
    "intervals": {"data", "files"},
    "train": {"checkpoint", "convert", "cpu_runtime", "data", "files", "inference", "losses",
              "models", "runs", "sharding"},
    "eval": {"data", "files", "inference", "intervals", "models", "runs", "sharding"},
    "predict": {"data", "dicom", "files", "inference", "intervals", "runs"},
    "experiments": {"data", "eval", "files", "inference", "intervals", "phantom", "runs", "train"},
}


def _modules() -> list[str]:
  out = []
  for folder, _, files in os.walk(_PACKAGE):
    out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(out)


def _part(path: str) -> str:
  """The top-level part of cmr_jax a module belongs to: a subpackage or a top-level module."""
  rel = os.path.relpath(path, _PACKAGE).split(os.sep)
  return rel[0] if len(rel) > 1 else rel[0][:-3]


def _imported_parts(path: str) -> set[str]:
  """The parts of cmr_jax that a module imports (at any depth of its code)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  parts = set()
  for name in names:
    bits = name.split(".")
    if bits[0] == "cmr_jax" and len(bits) > 1:
      parts.add(bits[1])
  return parts


@pytest.mark.parametrize("path", _modules(), ids=lambda p: os.path.relpath(p, _ROOT))
def test_module_is_small_and_imports_one_way(path):
  with open(path) as f:
    lines = sum(1 for _ in f)
  assert lines <= MAX_MODULE_LINES, f"{path}: {lines} lines (at most {MAX_MODULE_LINES})"
  part = _part(path)
  if part == "__init__":
    return
  assert part in ALLOWED, f"{part} is not in the layout table of this test: add it"
  upward = _imported_parts(path) - ALLOWED[part] - {part}
  assert not upward, f"{os.path.relpath(path, _ROOT)} imports {sorted(upward)}"


def test_layout_table_has_no_cycle():
  state: dict[str, str] = {}

  def visit(part: str, trail: tuple[str, ...]) -> None:
    assert state.get(part) != "open", f"import cycle: {' -> '.join(trail + (part,))}"
    if state.get(part) == "done":
      return
    state[part] = "open"
    for dep in ALLOWED[part]:
      visit(dep, trail + (part,))
    state[part] = "done"

  for part in ALLOWED:
    visit(part, ())


def test_library_defines_no_flags():
  for path in _modules():
    with open(path) as f:
      source = f.read()
    assert "DEFINE_" not in source and "config_flags" not in source, (
        f"{path} defines flags: programs (and their flags) live in tools/")


def test_every_program_follows_the_convention():
  tools = os.path.join(_ROOT, "tools")
  for name in sorted(os.listdir(tools)):
    if name.endswith(".py"):
      with open(os.path.join(tools, name)) as f:
        source = f.read()
      assert re.search(r'if __name__ == "__main__":\n  logs\.run\(main(, positional=True)?\)\n$',
                       source), f"tools/{name} does not end in logs.run(main)"
