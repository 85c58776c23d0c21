"""Runtime settings for programs that compute on the CPU: synchronous dispatch and a heap that keeps
its pages. Every program applies them at start (`logs.run` calls `configure`); library use does not.

Why (README "Step speed options"): XLA's CPU backend takes a training step's buffers from the C
heap, gigabytes per MViT-B step, and glibc hands freed large blocks back to the kernel (blocks over
its mmap threshold are unmapped on free, and a heap's free top is trimmed), so every step faults the
same memory in again: ~7.4 million minor page faults and a third of the step's CPU time on the
2-core CPU. Two settings together stop that:
- `jax_cpu_enable_async_dispatch=False`: the step runs on the calling (main) thread instead of a
  dispatch thread. The main thread allocates from glibc's main arena; a dispatch thread from an
  arena of its own, whose heaps are capped at 64 MiB and given back when they empty, whatever
  the settings below say.
- glibc `mallopt(M_MMAP_MAX, 0)` (no block is served by its own mmap) and `mallopt(M_TRIM_THRESHOLD,
  -1)` (the heap top is never handed back): the pages of one step's buffers serve the next step.
The resident memory stays at its peak (it does anyway within a step); the values are bit for bit
the same (`tests/test_speed.py`). Each setting alone left the faults; `M_ARENA_MAX=1` with
the heap settings also removed them but slowed XLA's compile by ~1.2x (its threads then share one
heap lock).

Only where JAX will compute on the CPU (`cpu_only`): with an accelerator plugin installed (or
`JAX_PLATFORMS` naming another platform) nothing is changed. `CMR_JAX_CPU_RUNTIME=default` turns
both off (jax reads `jax_cpu_enable_async_dispatch` from no environment variable).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

from absl import logging

ENV = "CMR_JAX_CPU_RUNTIME"  # "tuned" (default) or "default"
_SETTINGS = ("tuned", "default")
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied: dict[str, bool] = {}


def setting() -> str:
  """The `CMR_JAX_CPU_RUNTIME` setting; a value other than tuned/default is refused in one line."""
  value = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
  if value not in _SETTINGS:
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(_SETTINGS)}")
  return value


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU: `JAX_PLATFORMS` (or the older `JAX_PLATFORM_NAME`) names
  only cpu, or it is unset and no accelerator plugin (a `jax_plugins` entry point or module, or
  libtpu) is installed."""
  named = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
  platforms = {p.strip().lower() for p in named.split(",") if p.strip()}
  if platforms:
    return platforms == {"cpu"}
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  if importlib.util.find_spec("libtpu") is not None:
    return False
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      if os.path.isdir(folder) and any(not n.startswith((".", "_")) for n in os.listdir(folder)):
        return False
  return True


def keep_heap_pages() -> bool:
  """glibc: no mmap'd blocks, no heap trimming (see the module docstring). False where the C
  library is not glibc (nothing is changed there)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  # glibc reads the int -1 as the largest size_t: the top of the heap is never trimmed.
  return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


ALLOCATORS = ("jemalloc", "tcmalloc")  # preloadable C heaps (launch/with_allocator.sh)


def allocator(maps: str | None = None) -> str:
  """The C heap of this process: "jemalloc" or "tcmalloc" when one is mapped (preloaded, e.g.
  by launch/with_allocator.sh), else "glibc" (or "unknown" off Linux). `maps`: the text of
  /proc/self/maps (read when None)."""
  if maps is None:
    try:
      with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        maps = f.read()
    except OSError:
      return "unknown"
  names = {os.path.basename(line.split()[-1]) for line in maps.splitlines()
           if len(line.split()) >= 6}
  for name in ALLOCATORS:
    if any(n.startswith(f"lib{name}") for n in names):
      return name
  return "glibc" if platform.libc_ver()[0] == "glibc" else "unknown"


def configure() -> dict[str, bool]:
  """Applies the settings of the module docstring once per process, where they apply; returns
  (and logs) what is in effect: {"heap": ..., "sync_dispatch": ...}."""
  if _applied:
    return dict(_applied)
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  chosen = setting()
  tuned = chosen == "tuned" and cpu_only()
  heap = keep_heap_pages() if tuned else False
  if tuned:
    if xla_bridge.backends_are_initialized():  # the CPU client reads the setting when it is made
      logging.warning("JAX's backends started before cpu_runtime.configure(): dispatch stays "
                      "asynchronous")
    else:
      jax.config.update("jax_cpu_enable_async_dispatch", False)
  sync = not jax.config.values["jax_cpu_enable_async_dispatch"]
  _applied.update(heap=heap, sync_dispatch=sync)
  logging.info("CPU runtime: heap keeps its pages %s, synchronous dispatch %s (%s=%s), C heap %s",
               heap, sync, ENV, chosen, allocator())
  return dict(_applied)


def state() -> dict[str, bool]:
  """What `configure` applied in this process ({} if it was not called)."""
  return dict(_applied)
