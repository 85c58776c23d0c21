"""cmr_jax.cpu_runtime: where it applies, what it changes (page faults of a reused block, dispatch),
and (tests/test_speed.py) that training values stay bit for bit the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cmr_jax import cpu_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of writing a 256 MiB block, freeing it and writing a fresh one of the same size.
# With glibc's defaults the block is mmap'd and unmapped on free, so the second write faults every
# page again; with the heap keeping its pages it reuses them. Then one program run as ours are.
FAULTS = r"""
import ctypes, json, resource
from cmr_jax import cpu_runtime, logs

def faults_of_second_block():
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  size = 256 << 20
  block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size); ctypes.memset(block, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
  return faults

def main():
  import jax, jax.numpy as jnp
  assert float(jnp.arange(4.0).sum()) == 6.0  # the backend starts with the settings in force
  print(json.dumps({"state": cpu_runtime.state(), "faults": faults_of_second_block(),
                    "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))

logs.run(main)
"""


def _run(script: str, **env: str) -> dict:
  # glibc's malloc, whatever heap this process runs on (make test preloads jemalloc where it can).
  environ = {k: v for k, v in os.environ.items()
             if k not in (cpu_runtime.ENV, "JAX_PLATFORMS", "LD_PRELOAD", "MALLOC_CONF")}
  environ.update(env)
  out = subprocess.run([sys.executable, "-c", script], env=environ, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_programs_keep_heap_pages_and_dispatch_synchronously():
  tuned = _run(FAULTS, JAX_PLATFORMS="cpu")
  assert tuned["state"] == {"heap": True, "sync_dispatch": True} and tuned["async"] is False
  default = _run(FAULTS, JAX_PLATFORMS="cpu", **{cpu_runtime.ENV: "default"})
  assert default["state"] == {"heap": False, "sync_dispatch": False} and default["async"] is True
  pages = (256 << 20) // 4096
  assert default["faults"] > pages // 2  # every page faulted again (fewer only with huge pages)
  assert tuned["faults"] < pages // 50, (tuned, default)


def test_cpu_only_reads_platforms_and_plugins(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_runtime.cpu_only()
  for named in ("cuda", "cpu,cuda", "tpu", "cuda,cpu"):
    monkeypatch.setenv("JAX_PLATFORMS", named)
    assert not cpu_runtime.cpu_only(), named
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
  monkeypatch.setattr(cpu_runtime.importlib.metadata, "entry_points",
                      lambda group: ["jax_cuda12_plugin"] if group == "jax_plugins" else [])
  assert not cpu_runtime.cpu_only()


def test_bad_setting_is_refused_in_one_line(monkeypatch):
  monkeypatch.setenv(cpu_runtime.ENV, "fast")
  expected = "CMR_JAX_CPU_RUNTIME='fast': expected one of tuned, default"
  with pytest.raises(ValueError, match=expected):
    cpu_runtime.setting()
  monkeypatch.setenv(cpu_runtime.ENV, " Default ")
  assert cpu_runtime.setting() == "default"


LATE = r"""
import json, jax.numpy as jnp
from cmr_jax import cpu_runtime
jnp.ones(2).block_until_ready()  # the backend starts first
print(json.dumps(cpu_runtime.configure()))
"""


def test_backend_started_first_keeps_asynchronous_dispatch():
  state = _run(LATE, JAX_PLATFORMS="cpu")
  assert state["sync_dispatch"] is False and state["heap"] is True


MAPS_LINE = "7f00a000-7f00b000 r-xp 00000000 08:01 1234 {}\n"


@pytest.mark.parametrize("libraries, expected", [
    (["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6"],
     "jemalloc"),
    (["/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libc.so.6"], "tcmalloc"),
    (["/usr/lib/x86_64-linux-gnu/libc.so.6", "[heap]"], "glibc"),
])
def test_allocator_is_read_from_the_mapped_libraries(libraries, expected):
  maps = "7ffd0000-7ffd1000 rw-p 00000000 00:00 0\n" + "".join(MAPS_LINE.format(library)
                                                              for library in libraries)
  assert cpu_runtime.allocator(maps) == expected


def test_allocator_wrapper_preloads_what_it_is_told_and_refuses_a_missing_library(tmp_path):
  wrapper = os.path.join(REPO, "launch", "with_allocator.sh")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  script = "from cmr_jax import cpu_runtime; print(cpu_runtime.allocator())"
  glibc = subprocess.run([wrapper, sys.executable, "-c", script], capture_output=True, text=True,
                         env={**env, "CMR_JAX_MALLOC": "glibc"}, cwd=REPO, check=True)
  assert glibc.stdout.strip() == "glibc"
  missing = subprocess.run([wrapper, "true"], capture_output=True, text=True, cwd=REPO,
                           env={**env, "CMR_JAX_MALLOC": str(tmp_path / "libnope.so")})
  assert missing.returncode == 2
  assert missing.stderr.strip().endswith("libnope.so: no such file (auto, glibc or a library "
                                         "path)")
