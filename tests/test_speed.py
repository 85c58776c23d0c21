"""The step benchmark's machinery (`cmr_jax.train.speed`): the PyTorch peer in a process of its
own, round-robin timing with a warm-up per turn, and the XLA flags cmr_jax sets on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import cmr_jax
from cmr_jax import cpu_runtime
from cmr_jax.models import registry
from cmr_jax.train import speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_frames=4, image_size=32)


def test_peer_process_steps_the_same_network_in_a_child():
  config = registry.video_config("mvit_tiny", **TINY)
  video, labels = speed.random_batch(config, 2)
  here = speed.TorchStep(config, video, labels, threads=1)
  peer = speed.PeerProcess(config, video, labels, threads=1, keep_heap_pages=True)
  try:
    assert peer._process.pid != os.getpid() and peer._process.is_alive()
    peer()
    peer()
    info = peer.describe()
    assert info["params"] == here.num_params and info["threads"] == 1
    # The child set its heap as cpu_runtime does (glibc here), on request only.
    assert info == {**here.describe(), "own_process": True, "heap_keeps_pages": True}
  finally:
    peer.close()
  assert not peer._process.is_alive()


def test_peer_process_reports_the_childs_error():
  config = registry.video_config("mvit_tiny", **TINY)
  video, labels = speed.random_batch(config, 2)
  with pytest.raises(RuntimeError, match="peer process failed: .*set_num_threads"):
    speed.PeerProcess(config, video, labels, threads="two")


def test_alternate_warmup_discards_each_turns_first_call():
  # Each step is slow on its first call after the other one ran (as a framework after another
  # program's step), fast when it runs again.
  last = []
  calls = {"a": 0, "b": 0}

  def step(name):
    def fn():
      calls[name] += 1
      time.sleep(0.06 if not last or last[-1] != name else 0.002)
      last.append(name)
    return fn

  steps = {"a": step("a"), "b": step("b")}
  cold = speed.alternate(steps, steps_per_round=2, rounds=3)
  assert cold["a"] > 0.02 and cold["b"] > 0.02  # median of three slow, three fast calls
  assert calls == {"a": 6, "b": 6}
  warm = speed.alternate(steps, steps_per_round=2, rounds=3, warmup=1)
  assert warm["a"] < 0.03 and warm["b"] < 0.03
  assert calls == {"a": 6 + 9, "b": 6 + 9}


def _env_after_import(xla_flags: str | None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", "import os, cmr_jax; print(os.environ['XLA_FLAGS'])"],
                       env=env, cwd=REPO, capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_import_sets_default_xla_flags_without_overriding_the_users():
  (flag,) = cmr_jax.DEFAULT_XLA_FLAGS
  name = flag.split("=")[0]
  assert _env_after_import(None) == flag
  assert _env_after_import("--xla_force_host_platform_device_count=2") == (
      f"--xla_force_host_platform_device_count=2 {flag}")
  assert _env_after_import(f"{name}=true") == f"{name}=true"


STEP_DIGEST = """
import hashlib, jax, numpy as np
from cmr_jax.models import registry
from cmr_jax.train import speed
config = registry.video_config("mvit_tiny", num_frames=4, image_size=32)
video, labels = speed.random_batch(config, 2)
step = speed.JaxStep("mvit_tiny", config, video, labels, speed.JaxOptions(), forward_flops=False)
step(); step()
digest = hashlib.sha256()
for leaf in jax.tree.leaves(step.state):
  digest.update(np.asarray(leaf).tobytes())
print(digest.hexdigest())
"""


def _step_digest(script: str, **env: str) -> list[str]:
  """The output lines of `script` (STEP_DIGEST, maybe with a prefix) run in a fresh process with
  the persistent compilation cache off and `env` over this process's environment."""
  environ = {**{k: v for k, v in os.environ.items() if k not in env},
             "JAX_ENABLE_COMPILATION_CACHE": "false", **env}
  out = subprocess.run([sys.executable, "-c", script], env=environ, cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()


def test_cpu_scheduler_flag_changes_no_value():
  """Two AdamW steps of the tiny MViT give the same bits with XLA's concurrency-optimised CPU
  scheduler on (XLA's default) and off (cmr_jax's default), and the installed jaxlib accepts
  the flag (an unknown XLA flag aborts every program)."""
  (flag,) = cmr_jax.DEFAULT_XLA_FLAGS
  digests = [_step_digest(STEP_DIGEST, XLA_FLAGS=setting)[-1]
             for setting in (flag, flag.split("=")[0] + "=true")]
  assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_cpu_runtime_changes_no_value():
  """Two AdamW steps of the tiny MViT give the same bits with and without `cpu_runtime`'s
  synchronous dispatch and heap settings."""
  script = ("import json\nfrom cmr_jax import cpu_runtime\n"
            "print(json.dumps(cpu_runtime.configure()))\n" + STEP_DIGEST)
  runs = {}
  for setting in ("tuned", "default"):
    state, digest = _step_digest(script, JAX_PLATFORMS="cpu", CMR_JAX_CPU_RUNTIME=setting)[-2:]
    runs[setting] = (json.loads(state), digest)
  assert runs["tuned"][0] == {"heap": True, "sync_dispatch": True}
  assert runs["default"][0] == {"heap": False, "sync_dispatch": False}
  assert len(runs["tuned"][1]) == 64 and runs["tuned"][1] == runs["default"][1]


def test_preloaded_allocator_changes_no_value():
  """Two AdamW steps of the tiny MViT give the same bits under the allocator that
  launch/with_allocator.sh preloads (jemalloc or tcmalloc, as installed; CI installs jemalloc)
  and under glibc's malloc."""
  wrapper = os.path.join(REPO, "launch", "with_allocator.sh")
  script = "from cmr_jax import cpu_runtime\nprint(cpu_runtime.allocator())\n" + STEP_DIGEST
  environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  runs = {}
  for choice in ("auto", "glibc"):
    out = subprocess.run([wrapper, sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, env={**environ, "JAX_ENABLE_COMPILATION_CACHE": "false",
                                         "CMR_JAX_MALLOC": choice})
    assert out.returncode == 0, out.stderr[-2000:]
    runs[choice] = out.stdout.strip().splitlines()[-2:]
  if runs["auto"][0] == "glibc":
    pytest.skip("neither jemalloc nor tcmalloc is installed (apt install libjemalloc2)")
  assert runs["auto"][0] in cpu_runtime.ALLOCATORS and runs["glibc"][0] == "glibc"
  assert len(runs["auto"][1]) == 64 and runs["auto"][1] == runs["glibc"][1]
