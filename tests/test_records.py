"""Records: exact round trip, building (skips, duplicates, workers), corrupt bytes, splits."""

import collections
import dataclasses
import functools
import json
import math
import os

import grain
import numpy as np
import pytest

import conftest
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.data import types
from cmr_jax.phantom import synthetic

CFG = preprocess.PreprocessConfig(size=32, spacing_mm=4.0, num_frames=8)


def _assert_records_equal(a: types.StudyRecord, b: types.StudyRecord) -> None:
  for field in ("study_id", "subject_id", "site", "views", "spacing_mm", "report", "visit",
                "checksum"):
    assert getattr(a, field) == getattr(b, field), field
  for field in ("lvef", "edv", "esv"):
    x, y = getattr(a, field), getattr(b, field)
    assert (math.isnan(x) and math.isnan(y)) or x == y, field
  for field in ("frames", "slice_index", "slice_position_mm", "source_spacing_mm"):
    x, y = getattr(a, field), getattr(b, field)
    assert x.dtype == y.dtype and x.shape == y.shape, field
    np.testing.assert_array_equal(x, y, err_msg=field)


def test_round_trip_is_exact(make_study):
  record = preprocess.preprocess_study(make_study(1, labelled=False), CFG)
  back = records.deserialize_record(records.serialize_record(record))
  _assert_records_equal(record, back)
  assert math.isnan(back.lvef) and np.isnan(back.slice_position_mm[-1])
  assert preprocess.pixel_checksum(back.frames) == record.checksum


def test_garbage_bytes_are_not_a_record():
  with pytest.raises(records.CorruptRecordError, match="not a msgpack study record"):
    records.deserialize_record(b"\xc1\x00garbage")


def _items():
  study = functools.partial(conftest.fake_study, 0, num_sax=4, matrix=40, num_frames=12)
  return [
      ("s0", functools.partial(study, 0)),
      ("s1", functools.partial(study, 1, site="other")),
      ("bad-frames", functools.partial(conftest.broken_study, 7)),
      ("s0-again", functools.partial(study, 0)),  # same pixels as s0
      ("unreadable", conftest.raise_error),
      ("s2", functools.partial(study, 2, labelled=False)),
      ("s1-rescan", functools.partial(study, 1, visit=1, site="other")),
  ]


def _split_by_name(record):
  return "external" if record.site == "other" else "train"


def test_build_skips_bad_items_and_duplicates_and_reads_back(tmp_path):
  summary = records.build_dataset(_items(), str(tmp_path), cfg=CFG, split_fn=_split_by_name,
                                  num_shards=2, num_workers=0)
  assert summary.counts == {"train": 2, "external": 2}
  assert summary.num_items == 7 and summary.num_written == 4
  reasons = {s["item"]: s["reason"] for s in summary.skipped}
  assert set(reasons) == {"bad-frames", "unreadable"}
  assert "broken-7" in reasons["bad-frames"] and "4 frames" in reasons["bad-frames"]
  assert reasons["unreadable"] == "OSError: unreadable file"
  assert summary.duplicates == [
      {"item": "s0-again", "study_id": "fake-0-0000-v0", "duplicate_of": "fake-0-0000-v0"}]

  info = records.read_dataset_info(str(tmp_path))
  assert info["preprocess"] == CFG.to_dict()
  assert info["splits"]["train"]["files"] == [
      "train.array_record-00000-of-00002", "train.array_record-00001-of-00002"]
  assert info["splits"]["external"]["sites"] == {"other": 2}
  assert info["splits"]["train"]["labelled"] == 1
  expected_lvef = conftest.fake_study(0, 0).lvef
  assert info["label_stats"]["train"]["lvef"] == {"n": 1, "mean": expected_lvef, "sd": None}
  assert info["skipped"] == summary.skipped and info["duplicates"] == summary.duplicates
  assert info["splits"]["train"]["cine_files"] == [
      "train.cines.array_record-00000-of-00002", "train.cines.array_record-00001-of-00002"]
  assert info["splits"]["train"]["layout"] == records.LAYOUT_CINES
  assert sorted(os.listdir(tmp_path)) == sorted(
      [records.DATASET_INFO, "train.index.json", "external.index.json"]
      + [f for split in ("train", "external") for key in ("files", "cine_files")
         for f in info["splits"][split][key]])

  train = records.open_split(str(tmp_path), "train")
  assert len(train) == 2
  for i, (name, load) in enumerate([_items()[0], _items()[5]]):
    _assert_records_equal(train[i], preprocess.preprocess_study(load(), CFG))
    assert train.metadata[i]["study_id"] == train[i].study_id
  assert train.metadata[1]["lvef"] is None
  with pytest.raises(KeyError, match="split 'val' not in"):
    records.open_split(str(tmp_path), "val")


def test_build_with_workers_writes_the_same_files_and_survives_a_dying_worker(tmp_path):
  serial, parallel = tmp_path / "serial", tmp_path / "parallel"
  records.build_dataset(_items(), str(serial), cfg=CFG, split_fn=_split_by_name, num_shards=2)
  items = _items()
  items.insert(2, ("killer", conftest.kill_worker))
  summary = records.build_dataset(items, str(parallel), cfg=CFG, split_fn=_split_by_name,
                                  num_shards=2, num_workers=2)
  reasons = {s["item"]: s["reason"] for s in summary.skipped}
  assert set(reasons) == {"killer", "bad-frames", "unreadable"}  # only the killer is blamed
  assert reasons["killer"].startswith("its worker process died")
  names = sorted(os.listdir(serial))
  assert names == sorted(os.listdir(parallel))
  for name in names:
    if name != records.DATASET_INFO:
      assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_a_failing_split_rule_skips_that_record_only(tmp_path):
  lookup = {"fake-0-0000": "train"}
  summary = records.build_dataset(_items()[:2], str(tmp_path), cfg=CFG,
                                  split_fn=lambda r: lookup[r.subject_id])
  assert summary.counts == {"train": 1}
  assert summary.skipped == [{"item": "s1", "reason": "split: KeyError: 'fake-0-0001'"}]


def test_rebuild_replaces_previous_dataset(tmp_path):
  items = _items()
  records.build_dataset(items, str(tmp_path), cfg=CFG, split_fn=_split_by_name, num_shards=2)
  records.build_dataset(items[:2], str(tmp_path), cfg=CFG, split_fn=lambda r: "test")
  assert sorted(os.listdir(tmp_path)) == sorted(
      [records.DATASET_INFO, "test.index.json", "test.array_record-00000-of-00001",
       "test.cines.array_record-00000-of-00001"])


def test_study_cines_reads_single_cines_equal_to_the_whole_record(tmp_path):
  with_cines, without = tmp_path / "with", tmp_path / "without"
  records.build_dataset(_items(), str(with_cines), cfg=CFG, split_fn=_split_by_name,
                        num_shards=2)
  records.build_dataset(_items(), str(without), cfg=CFG, split_fn=_split_by_name, num_shards=2,
                        cine_shards=False)
  assert "cine_files" not in records.read_dataset_info(str(without))["splits"]["train"]
  for split in ("train", "external"):
    fast, whole = (records.open_split(str(d), split) for d in (with_cines, without))
    assert fast.has_cine_shards and not whole.has_cine_shards
    for i in range(len(fast)):
      record = whole[i]
      for study in (fast.study_cines(i), whole.study_cines(i)):
        assert study.record.num_cines == record.num_cines
        assert study.record.report == record.report and study.record.views == record.views
        for k in range(record.num_cines):
          np.testing.assert_array_equal(study.cine(k), record.frames[k])
  path = with_cines / "train.cines.array_record-00000-of-00002"  # study 0 of train only
  data = bytearray(path.read_bytes())
  data[20000:40000] = bytes(b ^ 0xFF for b in data[20000:40000])  # its cines (8 KB each)
  path.write_bytes(bytes(data))
  source = records.open_split(str(with_cines), "train")
  study = source.study_cines(0)
  with pytest.raises(records.CorruptRecordError, match=r"cine \d+ of study 0 of split train"):
    for k in range(study.record.num_cines):
      study.cine(k)
  with pytest.raises(records.CorruptRecordError, match=r"cine \d+ of study 0 of split train"):
    source[0]  # the whole record is assembled from the same cines
  source[1]  # the other study of that shard is intact


def _drop_layout(data_dir):
  """dataset_info.json as written before layouts were recorded."""
  info = records.read_dataset_info(str(data_dir))
  for split_info in info["splits"].values():
    del split_info["layout"]
  (data_dir / records.DATASET_INFO).write_text(json.dumps(info))


def test_pixels_stored_once_read_back_as_the_whole_records(tmp_path):
  once, twice, whole = tmp_path / "once", tmp_path / "twice", tmp_path / "whole"
  build = functools.partial(records.build_dataset, _items(), cfg=CFG, split_fn=_split_by_name,
                            num_shards=2)
  build(str(once))
  build(str(twice), pixels_twice=True)  # the layout before: whole records + per-cine copies
  build(str(whole), cine_shards=False)
  layouts = {d.name: records.read_dataset_info(str(d))["splits"]["train"]["layout"]
             for d in (once, twice, whole)}
  assert layouts == {"once": "cines", "twice": "whole", "whole": "whole"}
  for name in os.listdir(once):  # the per-cine shards are the same bytes; study shards lighter
    if ".cines." in name:
      assert (once / name).read_bytes() == (twice / name).read_bytes(), name
    elif ".array_record-" in name:
      headers, wholes = (grain.sources.ArrayRecordDataSource([str(d / name)])
                         for d in (once, twice))
      assert len(headers) == len(wholes) == 1
      header = records.deserialize_record(headers[0])
      assert header.frames.shape == (records.deserialize_record(wholes[0]).num_cines, 0, 0, 0)
      assert len(headers[0]) * 10 < len(wholes[0]), name
  _drop_layout(twice)  # as datasets built before this change are
  _drop_layout(whole)
  for split in ("train", "external"):
    sources = [records.open_split(str(d), split) for d in (once, twice, whole)]
    assert [s.layout for s in sources] == ["cines", "whole", "whole"]
    assert len(sources[0]) == len(sources[1]) == len(sources[2]) == 2
    for i in range(len(sources[0])):
      new, old, old_whole = (s[i] for s in sources)
      _assert_records_equal(new, old)
      _assert_records_equal(new, old_whole)
      assert not new.frames.flags.writeable  # like a decoded record's
      for s in sources:  # and the single-cine reads agree with them
        study = s.study_cines(i)
        _assert_records_equal(dataclasses.replace(study.record, frames=new.frames), new)
        for k in range(new.num_cines):
          np.testing.assert_array_equal(study.cine(k), new.frames[k])


def test_unknown_layout_is_refused_naming_the_file(tmp_path):
  records.build_dataset(_items()[:2], str(tmp_path), cfg=CFG, split_fn=lambda r: "train")
  info = records.read_dataset_info(str(tmp_path))
  info["splits"]["train"]["layout"] = "pixels-on-the-moon"
  (tmp_path / records.DATASET_INFO).write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"dataset_info.json: split 'train' has layout "
                                       r"'pixels-on-the-moon', unknown to this reader") as e:
    records.open_split(str(tmp_path), "train")
  assert "\n" not in str(e.value)
  info["splits"]["train"]["layout"] = "cines"
  del info["splits"]["train"]["cine_files"]
  (tmp_path / records.DATASET_INFO).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="has layout 'cines' but no cine_files"):
    records.open_split(str(tmp_path), "train")


def test_corrupt_bytes_name_the_record_and_file(tmp_path):
  records.build_dataset(_items()[:2], str(tmp_path), cfg=CFG, split_fn=lambda r: "train",
                        cine_shards=False)  # whole records: the pixels in the study shard
  path = tmp_path / "train.array_record-00000-of-00001"
  data = bytearray(path.read_bytes())
  data[1000] ^= 0xFF  # inside the first record's pixels (its chunk starts at byte 64)
  path.write_bytes(bytes(data))
  source = records.open_split(str(tmp_path), "train")
  with pytest.raises(records.CorruptRecordError,
                     match=r"record 0 of split train \(.*train.array_record-00000-of-00001, "
                           r"position 0\): unreadable"):
    source[0]


def test_non_record_bytes_name_the_record_and_file(tmp_path):
  records.build_dataset(_items()[:1], str(tmp_path), cfg=CFG, split_fn=lambda r: "train",
                        cine_shards=False)
  path = str(tmp_path / "train.array_record-00000-of-00001")
  writer = records.array_record_module.ArrayRecordWriter(path, records.DEFAULT_WRITER_OPTIONS)
  writer.write(b"\x93\x01\x02\x03")  # valid msgpack, not a record
  writer.close()
  with pytest.raises(records.CorruptRecordError,
                     match=r"record 0 of split train .*position 0\): not a study record"):
    records.open_split(str(tmp_path), "train")[0]


def _subjects(n):
  return [types.Study(study_id=f"st{i}-{v}", subject_id=f"sub{i}", site="a", cines=[], visit=v)
          for i in range(n) for v in range(2)]


def test_splits_grouped_deterministic_and_close_to_fractions():
  splitter = splits.SubjectSplitter(salt="s1")
  studies = _subjects(2000)
  assigned = [splitter(s) for s in studies]
  by_subject = collections.defaultdict(set)
  for study, split in zip(studies, assigned):
    by_subject[study.subject_id].add(split)
  assert all(len(v) == 1 for v in by_subject.values())  # rescans stay with their subject
  counts = collections.Counter(next(iter(v)) for v in by_subject.values())
  for name, fraction in splits.DEFAULT_FRACTIONS:
    assert counts[name] / 2000 == pytest.approx(fraction, abs=0.03)
  assert assigned == [splits.SubjectSplitter(salt="s1")(s) for s in studies]
  assert assigned != [splits.SubjectSplitter(salt="s2")(s) for s in studies]


def test_external_sites_and_fraction_validation():
  splitter = splits.SubjectSplitter.from_mapping({"train": 0.8, "test": 0.2}, salt="x",
                                                 external_sites=["siteC"])
  study = types.Study(study_id="a", subject_id="b", site="siteC", cines=[])
  assert splitter(study) == "external"
  with pytest.raises(ValueError, match="sum to 1"):
    splits.SubjectSplitter(fractions=(("train", 0.5), ("test", 0.2)))
  with pytest.raises(ValueError, match="not among"):
    splits.SubjectSplitter(fractions=(("external", 1.0),))
  with pytest.raises(ValueError, match="not among"):
    splits.SubjectSplitter(fractions=(("archive", 1.0),))


def test_archive_subjects_go_to_the_archive_splits_only():
  archive = frozenset(f"sub{i}" for i in range(1000, 3000))
  splitter = splits.SubjectSplitter(salt="s1", external_sites=frozenset({"siteC"}),
                                    archive_subjects=archive)
  studies = _subjects(3000)
  studies += [types.Study(study_id="ext-arc", subject_id="sub1500", site="siteC", cines=[]),
              types.Study(study_id="ext", subject_id="sub5", site="siteC", cines=[])]
  by_split = collections.defaultdict(set)
  for study in studies:
    by_split[splitter(study)].add(study.subject_id)
  archive_seen = by_split[splits.ARCHIVE] | by_split[splits.ARCHIVE_VAL]
  assert archive_seen == archive  # every archive subject, at any site, and nobody else
  others = set().union(*(v for k, v in by_split.items()
                         if k not in (splits.ARCHIVE, splits.ARCHIVE_VAL)))
  assert not others & archive
  assert others == {f"sub{i}" for i in range(1000)}
  assert by_split["external"] == {"sub5"}
  assert len(by_split[splits.ARCHIVE_VAL]) / len(archive) == pytest.approx(0.1, abs=0.03)
  # The other subjects keep the splits they get without an archive.
  plain = splits.SubjectSplitter(salt="s1")
  assert all(splitter(s) == plain(s) for s in studies[:2000])


def test_synthetic_archive_is_disjoint_from_every_fine_tuning_and_scoring_split(tmp_path):
  spec = synthetic.SyntheticSpec(num_subjects=6, num_external=2, num_archive=6,
                                 rescan_fraction=0.5, frames=8, matrix=48)
  synthetic.build_synthetic(spec, str(tmp_path), cfg=preprocess.PreprocessConfig(size=32),
                            num_shards=1)
  subjects = {split: {m["subject_id"] for m in records.load_index(str(tmp_path), split)}
              for split in records.read_dataset_info(str(tmp_path))["splits"]}
  archive = subjects.get(splits.ARCHIVE, set()) | subjects.get(splits.ARCHIVE_VAL, set())
  assert archive == {synthetic.subject_id(0, i) for i in range(8, 14)}
  scored = set().union(*(v for k, v in subjects.items()
                         if k not in (splits.ARCHIVE, splits.ARCHIVE_VAL)))
  assert scored == {synthetic.subject_id(0, i) for i in range(8)}
  assert not archive & scored
  assert "archive" in synthetic.summary_table(str(tmp_path))


def test_label_fractions_are_nested_and_sized():
  subjects = [f"sub{i}" for i in range(5000)]
  subsets = {f: {s for s in subjects if splits.in_label_fraction(s, f)} for f in (0.01, 0.1, 1.0)}
  assert subsets[0.01] <= subsets[0.1] <= subsets[1.0] == set(subjects)
  assert len(subsets[0.1]) / 5000 == pytest.approx(0.1, abs=0.02)
  assert len(subsets[0.01]) / 5000 == pytest.approx(0.01, abs=0.005)
