"""Run and data folders on Cloud Storage: a smoke pre-training and fine-tuning with the workdir, the
data, the vocabulary and the init all at gs:// URLs, against an in-process GCS emulator
(gcp-storage-emulator, in memory, on localhost: no network). gcsfs (through etils.epath) finds it
by STORAGE_EMULATOR_HOST, orbax's tensorstore by TENSORSTORE_GCS_HTTP_URL."""

import json
import logging
import os
import signal
import socket

import numpy as np
import pytest

from cmr_jax import files
from cmr_jax import inference
from cmr_jax import runs
from cmr_jax.train import common
from cmr_jax.train import finetune
from cmr_jax.train import pretrain

import sweep_testlib

BUCKET = "cmr-test"
_REAL_CHECK_FINITE = common.check_finite


def _with_generation(download):
  """The emulator's object download, sending the object's generation as real GCS does (the
  x-goog-generation header): tensorstore reads it to make the conditional writes of orbax's
  OCDBT manifests. (The emulator does not enforce ifGenerationMatch either: with one writer per
  file, as here, nothing depends on it.)"""
  def handler(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
    except Exception:  # pylint: disable=broad-except  # a missing object: the 404 follows
      pass
    return download(request, response, storage, *args, **kwargs)
  return handler


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """gs://cmr-test on an emulator for this module; the shard cache in a temporary folder."""
  emulator = pytest.importorskip("gcp_storage_emulator.server")
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s of exists()
  objects = pytest.importorskip("gcp_storage_emulator.handlers.objects")
  env = pytest.MonkeyPatch()
  env.setattr(objects, "download", _with_generation(objects.download))  # objects.get calls it
  port = _free_port()
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, google-cloud-storage (tensorboardX)
  env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's arrays
  env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # the emulator has no bucket-type API
  env.setenv(files.CACHE_ENV, str(tmp_path_factory.mktemp("shard_cache")))
  yield f"gs://{BUCKET}"
  env.undo()
  server.stop()


@pytest.fixture(scope="module")
def data(bucket, tmp_path_factory):
  """(local, gs://) copies of the tiny train/val dataset of test_train.py."""
  local = sweep_testlib.build_records(sweep_testlib.fake_items(range(12)),
                                     str(tmp_path_factory.mktemp("data")))
  remote = files.join(bucket, "data")
  for name in os.listdir(local):
    files.copy(os.path.join(local, name), files.join(remote, name))
  return local, remote


def _rows(workdir: str) -> list[dict]:
  """metrics.jsonl without wall-clock times and speeds, for comparing two runs."""
  rows = [json.loads(line) for line in files.read_text(files.join(workdir, "metrics.jsonl"))
          .splitlines()]
  return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_per_s")} for r in rows]


def _by_step(rows: list[dict]) -> dict:
  """Rows by (step, kind of row), as JSON (NaN equals NaN); a step re-run after a resume keeps
  its last row."""
  return {(r["step"], tuple(sorted(r))): json.dumps(r, sort_keys=True) for r in rows}


def _pretrain_config(data_dir: str):
  return sweep_testlib.pretrain_config(data_dir, vocab="")  # the run learns and saves its own


def test_smoke_runs_with_every_path_on_gs_equal_local_runs(bucket, data, tmp_path, monkeypatch):
  local_data, gs_data = data
  monkeypatch.chdir(tmp_path)  # a path mistaken for local would land here, as ./gs:/...
  here = tmp_path / "local"

  # Pre-training: a local reference, then on gs://, stopped by SIGTERM at step 3 and resumed.
  local_pre = str(here / "pretrain")
  assert pretrain.train_and_evaluate(_pretrain_config(local_data), local_pre)["step"] == 6
  gs_pre = files.join(bucket, "runs", "pretrain")

  def sigterm_at_3(step, *args):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return _REAL_CHECK_FINITE(step, *args)

  monkeypatch.setattr(common, "check_finite", sigterm_at_3)
  stopped = pretrain.train_and_evaluate(_pretrain_config(gs_data), gs_pre)
  assert stopped["step"] == 3 and stopped["preempted"]
  assert runs.checkpoint_steps(gs_pre) == [2, 3]
  monkeypatch.setattr(common, "check_finite", _REAL_CHECK_FINITE)
  assert pretrain.train_and_evaluate(_pretrain_config(gs_data), gs_pre)["step"] == 6
  assert runs.latest_step(gs_pre) == 6
  assert files.read_text(runs.tokenizer_path(runs.load_config(gs_pre), gs_pre)) == \
      (here / "pretrain" / "tokenizer" / "vocab.txt").read_text()
  assert _by_step(_rows(gs_pre)) == _by_step(_rows(local_pre))  # losses, evals: equal

  # Fine-tuning from each pre-training run, on its own data.
  local_ft = str(here / "finetune")
  gs_ft = files.join(bucket, "runs", "finetune")
  local_result = finetune.train_and_evaluate(
      sweep_testlib.finetune_config(local_data, f"pretrain:{local_pre}"), local_ft)
  gs_result = finetune.train_and_evaluate(
      sweep_testlib.finetune_config(gs_data, f"pretrain:{gs_pre}"), gs_ft)
  assert gs_result["best_val_mae"] == local_result["best_val_mae"]
  assert _by_step(_rows(gs_ft)) == _by_step(_rows(local_ft))
  assert runs.read_best(gs_ft) == runs.read_best(local_ft)

  # Everything a run writes is in the bucket; prediction reads it back from there.
  for run, names in ((gs_pre, ["config.json", "metrics.jsonl", "tokenizer", "tb"]),
                     (gs_ft, ["config.json", "metrics.jsonl", "best.json", "preprocess.json",
                              "best", "tb"])):
    assert set(names) <= set(files.listdir(run)), files.listdir(run)
  assert runs.latest_step(gs_ft) == runs.latest_step(local_ft)
  np.testing.assert_array_equal(inference.predict_run(gs_ft, gs_data, "val")["pred"],
                                inference.predict_run(local_ft, local_data, "val")["pred"])
  assert sorted(os.listdir(tmp_path)) == ["local"]  # no ./gs:/ folder, nothing else local


def test_unknown_scheme_and_missing_package_are_one_clear_line(monkeypatch):
  with pytest.raises(ValueError, match="memory://x/config.json: unsupported URL scheme"):
    runs.load_config("memory://x")
  monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"gs://b/run/config.json: .*pip install gcsfs"):
    runs.load_config("gs://b/run")
