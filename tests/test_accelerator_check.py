"""tools/accelerator_check.py rehearsed on the CPU (--quick), and its batch-size extrapolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

from cmr_jax.train import speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 2**30


def test_largest_batch_extrapolates_the_memory_analysis():
  step = types.SimpleNamespace(temp_bytes=4 * GB, state_bytes=2 * GB)  # compiled at batch 8
  # (0.9 * 80 GB - 2 GB) / 0.5 GB per clip = 140 clips, rounded down to a multiple of 8.
  assert speed.largest_batch(step, 8, 80 * GB, max_batch=512, multiple=8) == 136
  assert speed.largest_batch(step, 8, 80 * GB, max_batch=100, multiple=8) == 96
  assert speed.largest_batch(step, 8, 2 * GB, max_batch=512, multiple=8) == 1
  assert speed.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
  assert not speed.is_out_of_memory(ValueError("shapes do not match"))


def test_quick_check_runs_every_phase_and_writes_sane_json(tmp_path):
  out = tmp_path / "check.json"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "accelerator_check.py"),
                         "--quick", f"--out={out}", "--budget_s=3000"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
  assert (result["quick"], result["config"], result["dtype"]) == (True, "mvit_tiny", "float32")
  train = result["train"]
  assert train["platform"] == "cpu" and "error" not in train
  for remat in (False, True):
    t = train[f"remat_{remat}"]
    assert t["remat"] is remat and t["batch"] == 4 and t["step_s"] > 0 and t["compile_s"] > 0
    assert abs(t["clips_per_s"] - 4 / t["step_s"]) < 0.01 * t["clips_per_s"] + 1e-3
    assert t["step_tflop"] > 0 and t["mfu"] is None  # float32 on a CPU: no peak to divide by
  assert train["best"]["clips_per_s"] == max(train[f"remat_{r}"]["clips_per_s"]
                                             for r in (False, True))
  peer = result["peer"]
  assert peer["impl"].startswith(("pytorchvideo", "torchvision")) and peer["batch"] == 4
  assert peer["jax_over_peer_clips_per_s"] > 0 and not peer["torch_compile"]
  assert abs(peer["jax_over_peer_clips_per_s"] * peer["clips_per_s"]
             - train["best"]["clips_per_s"]) < 0.01 * train["best"]["clips_per_s"]
  data = result["input"]
  assert data["clips_per_s_per_host"] > 0
  assert data["input_over_consumption"] > 0
