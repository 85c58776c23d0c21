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
  environ = {k: v for k, v in os.environ.items() if k not in (cpu_runtime.ENV, "JAX_PLATFORMS")}
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
