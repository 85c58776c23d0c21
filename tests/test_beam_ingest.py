"""The Beam pipeline's per-study function, and the pipeline on the direct runner.

The direct-runner test needs the `beam` extra, which `make test` installs into its own venv
(`.venv-beam`) and runs this file there with CMR_JAX_REQUIRE_BEAM=1, so that a broken install
fails instead of skipping. Elsewhere the test skips without apache_beam.
"""

import dataclasses
import importlib
import os

import pytest

from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.dicom import beam_pipeline
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.testing import dicom_writer

import dicom_testlib

SALT = "beam-test-salt-123"
REQUIRE_BEAM_ENV = "CMR_JAX_REQUIRE_BEAM"


def _require_beam() -> None:
  """Imports apache_beam: skips without it, unless $CMR_JAX_REQUIRE_BEAM says it must be there."""
  if os.environ.get(REQUIRE_BEAM_ENV):
    importlib.import_module("apache_beam")
  else:
    pytest.importorskip("apache_beam", reason="optional extra: pip install -e '.[beam]'")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """Three small studies (one without a usable cine) ingested by the local runner."""
  root = str(tmp_path_factory.mktemp("beam"))
  studies = [dicom_testlib.phantom_study(i, num_sax=3) for i in (60, 61)]
  studies.append(dataclasses.replace(studies[0], cines=[
      dataclasses.replace(c, frames=c.frames[:4]) for c in studies[0].cines]))  # too few frames
  base = dicom_writer.write_kaggle(studies, root, ids=[60, 61, 62],
                                   faults=[dicom_writer.Faults(non_dicom_file=True)] * 3)
  opts = ingest.IngestOptions(layout=layouts.KAGGLE, input=base, output=os.path.join(
      root, "local"), salt=SALT, preprocess=dicom_testlib.TINY_CFG)
  summary = ingest.run_ingest(opts)
  assert summary.converted == 2
  return opts


def _records(output):
  out = {}
  for split in records.read_dataset_info(output)["splits"]:
    source = records.open_split(output, split)
    out.update((r.study_id, r) for r in (source[i] for i in range(len(source))))
  return out


def _manifest(output):
  return sorted(tuple(r.values()) for r in ingest.read_manifest(os.path.join(output,
                                                                             ingest.MANIFEST)))


def test_convert_study_is_the_local_per_study_function(local_run):
  local = _records(local_run.output)
  rows = []
  for spec in layouts.discover(layouts.KAGGLE, local_run.input).specs:
    converted = beam_pipeline.convert_study(spec, salt=SALT, root=local_run.input,
                                          cfg=local_run.preprocess,
                                          split_fn=splits.SubjectSplitter())
    rows += [tuple(getattr(r, c) for c in ingest.MANIFEST_COLUMNS) for r in converted.rows]
    if converted.record:
      assert records.deserialize_record(converted.record).checksum == (
          local[converted.study_id].checksum)
    else:
      assert converted.study_id not in local and "no usable cine" in converted.reason
  assert sorted(rows) == _manifest(local_run.output)


def test_beam_direct_runner_writes_the_same_dataset(local_run, tmp_path):
  _require_beam()
  opts = dataclasses.replace(local_run, output=str(tmp_path / "beam"), num_shards=2)
  summary = beam_pipeline.run_beam_ingest(opts)
  assert (summary.num_studies, summary.converted, summary.skipped_studies) == (3, 2, 1)
  assert summary.files_in == summary.files_used + summary.files_skipped
  beam, local = _records(opts.output), _records(local_run.output)
  assert sorted(beam) == sorted(local)
  assert all(beam[k].checksum == local[k].checksum for k in local)
  assert _manifest(opts.output) == _manifest(local_run.output)
  (skipped,) = records.read_dataset_info(opts.output)["skipped"]
  assert skipped["item"] not in local and "no usable cine" in skipped["reason"]
