"""Ingest runs: phantom DICOM trees -> records equal to the phantom's, manifest, resume,
rescans, speed, and no identifier in any output."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import types
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax.dicom import pseudonym
from cmr_jax.testing import dicom_writer

import conftest
import dicom_testlib

SALT = "test-salt-0123456789"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAGGLE_IDS = [734500 + i for i in range(10)]
FAULTY = 9  # the study with injected faults
COMPARED = 3  # studies compared with records made directly from the phantom


def _all_records(output: str) -> dict[str, types.StudyRecord]:
  out = {}
  for split in records.read_dataset_info(output)["splits"]:
    source = records.open_split(output, split)
    out.update((r.study_id, r) for r in (source[i] for i in range(len(source))))
    assert source.has_cine_shards  # the parts' per-cine shards, listed in the catalogue
    assert source.layout == records.LAYOUT_CINES  # the pixels stored there only
    for i in range(len(source)):
      study = source.study_cines(i)
      assert study.record.study_id == source.metadata[i]["study_id"]
      for k in range(study.record.num_cines):
        np.testing.assert_array_equal(study.cine(k), out[study.record.study_id].frames[k])
  return out


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory):
  """Ten phantom studies in the Kaggle layout, ingested with 2 workers in two parts."""
  root = str(tmp_path_factory.mktemp("kaggle"))
  studies = [dicom_testlib.phantom_study(i, num_sax=6, frames=10 if i == FAULTY else
                                         dicom_testlib.FRAMES) for i in range(len(KAGGLE_IDS))]
  faults = [dicom_writer.Faults()] * FAULTY + [dicom_writer.Faults(
      truncated_file=True, non_dicom_file=True, no_pixel_data=True, duplicate_slice=True,
      single_frame_series=True, mixed_matrix=True, scout_series=True)]
  base = dicom_writer.write_kaggle(studies, root, ids=KAGGLE_IDS, faults=faults)
  opts = ingest.IngestOptions(layout=layouts.KAGGLE, input=base, output=os.path.join(
      root, "records"), salt=SALT, workers=2, chunk_studies=5, preprocess=dicom_testlib.TINY_CFG)
  start = time.monotonic()
  summary = ingest.run_ingest(opts)
  elapsed = time.monotonic() - start
  print(f"\ningest of {len(studies)} phantom studies ({dicom_testlib.count_files(base)} files, "
        f"{dicom_testlib.FRAMES} frames of {dicom_testlib.MATRIX}x{dicom_testlib.MATRIX}), "
        f"2 workers: {summary.studies_per_s:.2f} studies/s converting, {elapsed:.1f} s in all")
  ids = {s.key: ingest.study_pseudonyms(s, SALT)[0]
         for s in layouts.discover(layouts.KAGGLE, base).specs}
  return studies, base, opts, summary, ids


def test_kaggle_records_reproduce_the_phantom(kaggle_run):
  studies, _, opts, summary, ids = kaggle_run
  assert summary.converted == summary.num_studies == len(studies)
  # 2 workers convert, on as many CPUs as this process may use (studies/s/core in the summary).
  assert summary.cores == min(2, len(os.sched_getaffinity(0)))
  assert summary.studies_per_s_per_core == pytest.approx(summary.studies_per_s / summary.cores)
  stored = _all_records(opts.output)
  assert len(stored) == len(studies)
  for study, kaggle_id in list(zip(studies, KAGGLE_IDS))[:COMPARED]:
    record = stored[ids[str(kaggle_id)]]
    direct = preprocess.preprocess_study(
        dicom_testlib.without_views(study, (types.LAX_3CH,)), dicom_testlib.TINY_CFG)
    assert record.views == direct.views
    np.testing.assert_array_equal(record.slice_index, direct.slice_index)
    sax = record.slice_index >= 0
    np.testing.assert_allclose(record.slice_position_mm[sax], direct.slice_position_mm[sax],
                               atol=0.01)
    diff = np.abs(record.frames.astype(np.float32) - direct.frames.astype(np.float32))
    print(f"study {kaggle_id}: mean |diff| {diff.mean():.3f} grey levels, max {diff.max():.0f}")
    assert diff.mean() < 1.0
    assert record.lvef == pytest.approx(study.lvef, abs=0.01)  # from train.csv volumes
    assert (record.edv, record.esv) == pytest.approx((study.edv, study.esv), abs=1e-3)
    assert record.subject_id != record.study_id and record.site == "kaggle"


def test_manifest_accounts_for_every_file(kaggle_run):
  _, base, opts, summary, ids = kaggle_run
  rows = ingest.read_manifest(os.path.join(opts.output, ingest.MANIFEST))
  assert len(rows) == summary.files_in == dicom_testlib.count_files(base)
  assert summary.files_in == summary.files_used + summary.files_skipped
  assert sum(r["status"] == assemble.USED for r in rows) == summary.files_used
  assert len({r["file"] for r in rows}) == len(rows)
  faulty = [r for r in rows if r["study"] == ids[str(KAGGLE_IDS[FAULTY])]]
  reasons = {r["reason"] for r in faulty if r["status"] == assemble.SKIPPED}
  assert reasons == {
      "not a DICOM file", "no pixel data (not an image)", "non-cine series (scout/localiser)",
      f"too few frames (1 < {assemble.MIN_CINE_FRAMES}): not a cine",
      "duplicate SAX position: superseded by series 100",
      "inconsistent geometry: mixed matrix sizes 28x28, 32x32",
      "pixel data shorter than its header claims (876 of 2048 bytes for 1 frame of 32x32 "
      "at 16 bits)"}
  others = [r for r in rows if r["study"] != ids[str(KAGGLE_IDS[FAULTY])]]
  assert all(r["status"] == assemble.USED for r in others)
  info = records.read_dataset_info(opts.output)
  assert info["ingest"]["files_in"] == summary.files_in
  assert sum(s["num_records"] for s in info["splits"].values()) == len(KAGGLE_IDS)


def test_kaggle_ids_and_paths_stay_out_of_the_outputs(kaggle_run):
  _, base, opts, _, _ = kaggle_run
  outputs = dicom_testlib.all_bytes_below(opts.output)
  for kaggle_id in KAGGLE_IDS:
    assert not any(str(kaggle_id).encode() in data for data in outputs.values()), kaggle_id
  assert not any(base.encode() in data for data in outputs.values())


def test_rerun_resumes_and_redoes_only_an_unfinished_part(kaggle_run):
  _, _, opts, first, _ = kaggle_run
  before = _all_records(opts.output)
  opts = dataclasses.replace(opts, workers=0)
  again = ingest.run_ingest(opts)
  assert (again.converted, again.resumed) == (0, len(KAGGLE_IDS))
  assert (again.files_in, again.files_used) == (first.files_in, first.files_used)
  os.remove(os.path.join(opts.output, ingest.PARTS, "part-00001" + ingest.DONE_SUFFIX))
  redone = ingest.run_ingest(opts)
  assert (redone.converted, redone.resumed) == (5, len(KAGGLE_IDS) - 5)
  after = _all_records(opts.output)
  assert sorted(after) == sorted(before)
  for study_id, record in after.items():
    assert record.checksum == before[study_id].checksum
  with pytest.raises(ValueError, match="another preprocessing config"):
    ingest.run_ingest(dataclasses.replace(
        opts, preprocess=dataclasses.replace(dicom_testlib.TINY_CFG, size=24)))


def test_ukbb_rescans_share_a_subject_pseudonym(tmp_path):
  studies = [dicom_testlib.phantom_study(50, site="ukbb_like", num_sax=3),
             dicom_testlib.phantom_study(50, site="ukbb_like", visit=1, num_sax=3),
             dicom_testlib.phantom_study(51, site="ukbb_like", num_sax=3)]
  eids = [1000050, 1000050, 1000051]
  labels = dicom_writer.write_ukbb(studies, str(tmp_path / "zips"), eids=eids,
                                   options=dicom_writer.WriteOptions(single_sax_series=True))
  output = str(tmp_path / "records")
  summary = ingest.run_ingest(ingest.IngestOptions(
      layout=layouts.UKBB, input=str(tmp_path / "zips"), output=output, salt=SALT,
      labels=labels, preprocess=dicom_testlib.TINY_CFG))
  assert summary.converted == 3 and summary.files_in == summary.files_used + summary.files_skipped
  stored = sorted(_all_records(output).values(), key=lambda r: (r.subject_id, r.visit))
  by_visit = {(r.subject_id, r.visit): r for r in stored}
  pair = [r for r in stored if sum(s.subject_id == r.subject_id for s in stored) == 2]
  assert [r.visit for r in pair] == [0, 1] and pair[0].study_id != pair[1].study_id
  assert len(by_visit) == 3 and len({r.subject_id for r in stored}) == 2
  for record in stored:
    study = studies[0] if record in pair[:1] else studies[1] if record in pair[1:] else studies[2]
    assert record.lvef == pytest.approx(study.lvef, abs=1e-3)
    assert record.views == [types.SAX] * 3 + list(types.LONG_AXIS_VIEWS)
  splits = [records.load_index(output, s) for s in records.read_dataset_info(output)["splits"]]
  split_of = {m["study_id"]: i for i, index in enumerate(splits) for m in index}
  assert split_of[pair[0].study_id] == split_of[pair[1].study_id]
  outputs = dicom_testlib.all_bytes_below(output)
  assert not any(str(eid).encode() in data for eid in eids for data in outputs.values())


def _run_cli(*args: str, env_salt: str = "") -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != pseudonym.SALT_ENV_VAR}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if env_salt:
    env[pseudonym.SALT_ENV_VAR] = env_salt
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "ingest.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cli_refuses_to_run_without_a_salt(tmp_path):
  result = _run_cli("--layout=generic", f"--input={tmp_path}", f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "no pseudonymisation salt" in result.stderr and "--salt" in result.stderr
  assert not os.path.exists(tmp_path / "out")


def test_no_identifier_reaches_records_manifest_info_or_logs(tmp_path):
  studies, identities, images, labels, reports = dicom_testlib.generic_archive(tmp_path)
  output, logs = tmp_path / "out", tmp_path / "logs"
  os.makedirs(logs)
  result = _run_cli("--layout=generic", f"--input={images}", f"--output={output}",
                    f"--labels={labels}", f"--reports={reports}", f"--log_dir={logs}",
                    "--alsologtostderr", f"--path_key={tmp_path / 'private_paths.csv'}",
                    env_salt=SALT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "files: " in result.stdout and " studies/s/core (1 cores)" in result.stdout
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["cores"] == 1 and summary["studies_per_s_per_core"] == summary["studies_per_s"]
  stored = _all_records(str(output))
  assert len(stored) == len(studies)
  assert all(pseudonym.REDACTED in r.report and "normal function" in r.report
             for r in stored.values())
  # Every identifying value written into the DICOM files, and the identifying paths.
  secrets = {"DOE_JANE_2015", "DOE_JANE_2017", "ROE_RICHARD", images}
  for who in identities:
    secrets.update(pseudonym.identifier_strings([
        who.patient_name, who.patient_id, who.birth_date, who.study_date, who.accession,
        who.institution, who.referring_physician]))
  files, _ = dicom_files.list_input_files(images)
  for parsed in parse.read_files(files):
    if parsed.dataset is not None:
      secrets.update({parsed.study_uid, parsed.sop_uid, parsed.series.key})
  secrets.discard("Alice")  # a name part shared by all identities: checked below anyway
  haystacks = dicom_testlib.all_bytes_below(str(output))
  haystacks.update(dicom_testlib.all_bytes_below(str(logs)))
  haystacks["stdout"] = result.stdout.encode()
  haystacks["stderr"] = result.stderr.encode()
  assert len(haystacks) > 6
  for where, data in haystacks.items():
    text = data.lower()
    for secret in secrets | {"Alice"}:
      assert secret.lower().encode() not in text, (secret, where)
  with open(tmp_path / "private_paths.csv") as f:  # the data owner's key does hold paths
    assert "DOE_JANE_2015" in f.read()


def test_catalogue_of_parts_built_before_and_after_pixels_were_stored_once(tmp_path):
  cfg = preprocess.PreprocessConfig(size=32, spacing_mm=4.0, num_frames=8)
  output = str(tmp_path)
  for index, options in enumerate([dict(pixels_twice=True), {}, dict(cine_shards=False)]):
    items = [(f"s{index}-{i}", functools.partial(conftest.fake_study, index, i, num_sax=3,
                                                 matrix=40, num_frames=10)) for i in range(2)]
    records.build_dataset(items, ingest.outputs.part_dir(output, index), cfg=cfg,
                          split_fn=lambda r: "train", **options)
  parts = [records.open_split(ingest.outputs.part_dir(output, i), "train") for i in range(2)]
  assert [p.layout for p in parts] == [records.LAYOUT_WHOLE, records.LAYOUT_CINES]
  ingest._merge_parts(output, [0, 1], cfg, {})  # both have per-cine shards: read from them
  merged = records.open_split(output, "train")
  assert merged.layout == records.LAYOUT_CINES and len(merged) == 4
  expected = [part[i] for part in parts for i in range(len(part))]
  for i, record in enumerate(expected):
    assert merged[i].study_id == record.study_id and merged[i].report == record.report
    np.testing.assert_array_equal(merged[i].frames, record.frames)
  ingest._merge_parts(output, [0, 2], cfg, {})  # whole records only: read whole
  assert records.open_split(output, "train").layout == records.LAYOUT_WHOLE
  with pytest.raises(ValueError, match="cannot join .*part-00001.*rebuild with --overwrite"):
    ingest._merge_parts(output, [1, 2], cfg, {})
