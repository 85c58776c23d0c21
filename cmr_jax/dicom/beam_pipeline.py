"""The ingest's per-study function on Apache Beam, for archives beyond one machine.

Beam is the engine tensorflow-datasets builds large datasets on; the same pipeline runs on the
direct runner (tests, one machine) and on Dataflow, Flink or Spark. The driver discovers the
studies (`layouts.discover`), then:

  specs -> Map(convert_study) -> records keyed by (split, shard) -> GroupByKey -> write one
  ArrayRecord shard per key;  file rows -> manifest.csv;  shard metadata -> dataset_info.json

`convert_study` is `ingest.load_study` + `preprocess.preprocess_study` + serialisation: the
per-study function of the local runs, which use `records.build_dataset` instead. Output is the
same dataset format (`records.open_split` reads it) and the same manifest.

apache-beam is an optional extra (`pip install -e '.[beam]'`): it pins older protobuf/pyarrow
than the rest of the stack, so it is kept out of the default install. `convert_study` does not
import it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import time
from collections.abc import Sequence

from absl import logging
from array_record.python import array_record_module

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts

MANIFEST_SHARD_TEMPLATE = ""  # one manifest file, no shard suffix


@dataclasses.dataclass
class Converted:
  """What `convert_study` makes of one study."""

  study_id: str
  split: str = ""
  record: bytes = b""  # serialised StudyRecord; empty when the study is skipped
  metadata: dict | None = None  # `records.record_metadata`
  rows: list[ingest.FileRow] = dataclasses.field(default_factory=list)
  reason: str = ""  # why there is no record
  skipped_cines: list[str] = dataclasses.field(default_factory=list)


def convert_study(spec: layouts.StudySpec, *, salt: str, root: str,
                  cfg: preprocess.PreprocessConfig, split_fn,
                  limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> Converted:
  """Reads, assembles, pseudonymises and preprocesses one study; never raises."""
  loaded = ingest.load_study(spec, salt=salt, root=root, min_frames=cfg.min_frames,
                             limits=limits)
  study_id, _ = ingest.study_pseudonyms(spec, salt)
  if loaded.study is None:
    return Converted(study_id, rows=loaded.rows, reason=loaded.reason)
  left_out: list[str] = []
  try:
    record = preprocess.preprocess_study(loaded.study, cfg, left_out)
  except ValueError as e:
    rows = ingest.mark_unconverted(loaded.rows, failed={study_id: str(e)})
    return Converted(study_id, rows=rows, reason=str(e), skipped_cines=left_out)
  return Converted(study_id, split=str(split_fn(record)), record=records.serialize_record(record),
                   metadata=records.record_metadata(record),
                   rows=ingest.mark_unconverted(loaded.rows, skipped_cines=left_out),
                   skipped_cines=left_out)


def shard_of(study_id: str, num_shards: int) -> int:
  """A study's shard: a stable hash of its pseudonym."""
  return int.from_bytes(hashlib.sha256(study_id.encode()).digest()[:4], "big") % num_shards


def write_shard(key_and_records, *, output: str, num_shards: int) -> ingest.Shard:
  """Writes one (split, shard) group of (study_id, record bytes, metadata) to ArrayRecord."""
  (split, shard), group = key_and_records
  group = sorted(group, key=lambda item: item[0])  # deterministic order within the shard
  name = records.SHARD_PATTERN.format(split=split, index=shard, count=num_shards)
  writer = array_record_module.ArrayRecordWriter(os.path.join(output, name),
                                                 records.DEFAULT_WRITER_OPTIONS)
  for _, data, _ in group:
    writer.write(data)
  writer.close()
  return ingest.Shard(split, name, [metadata for _, _, metadata in group])


def manifest_line(row: ingest.FileRow) -> str:
  """A manifest row as one CSV line."""
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="").writerow(
      [getattr(row, c) for c in ingest.MANIFEST_COLUMNS])
  return buffer.getvalue()


def _finish(shards: list[ingest.Shard], converted_info: list[tuple[str, str, list[str]]], *,
            output: str, cfg: preprocess.PreprocessConfig, num_items: int, extra: dict) -> None:
  skipped = [{"item": sid, "reason": reason} for sid, reason, _ in converted_info if reason]
  skipped_cines = [m for _, _, messages in converted_info for m in messages]
  ingest.write_catalogue(output, sorted(shards, key=lambda s: s.path), cfg, num_items=num_items,
                         skipped=skipped, skipped_cines=skipped_cines, duplicates=[],
                         extra=extra)


def build_pipeline(pipeline, discovery: layouts.Discovery, opts: ingest.IngestOptions) -> None:
  """Adds the ingest of `discovery` to a Beam pipeline (run it to write the dataset)."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel

  split_fn = ingest.split_function(opts)
  output = os.path.abspath(opts.output)
  converted = (
      pipeline
      | "Studies" >> beam.Create(discovery.specs)
      | "Reshuffle" >> beam.Reshuffle()
      | "Convert" >> beam.Map(convert_study, salt=opts.salt, root=opts.input,
                              cfg=opts.preprocess, split_fn=split_fn, limits=opts.limits))
  shards = (
      converted
      | "WithRecord" >> beam.Filter(lambda c: bool(c.record))
      | "KeyByShard" >> beam.Map(lambda c: ((c.split, shard_of(c.study_id, opts.num_shards)),
                                            (c.study_id, c.record, c.metadata)))
      | "GroupShards" >> beam.GroupByKey()
      | "WriteShards" >> beam.Map(write_shard, output=output, num_shards=opts.num_shards)
      | "AllShards" >> beam.combiners.ToList())
  info = (converted
          | "Outcomes" >> beam.Map(lambda c: (c.study_id, c.reason, c.skipped_cines))
          | "AllOutcomes" >> beam.combiners.ToList())
  extra = {"ingest": {"layout": opts.layout, "studies_found": len(discovery.specs),
                      "engine": "beam"}}
  _ = (shards
       | "Catalogue" >> beam.Map(_finish, converted_info=beam.pvalue.AsSingleton(info),
                                 output=output, cfg=opts.preprocess,
                                 num_items=len(discovery.specs), extra=extra))
  orphans = [ingest.FileRow(ingest.file_pseudonym(r, opts.input, opts.salt), "", "",
                            assemble.SKIPPED, reason) for r, reason in discovery.orphans]
  rows = ((converted | "Rows" >> beam.FlatMap(lambda c: c.rows),
           pipeline | "Orphans" >> beam.Create(orphans))
          | "AllRows" >> beam.Flatten())
  _ = (rows
       | "Lines" >> beam.Map(manifest_line)
       | "Manifest" >> beam.io.WriteToText(
           os.path.join(output, ingest.MANIFEST), shard_name_template=MANIFEST_SHARD_TEMPLATE,
           header=",".join(ingest.MANIFEST_COLUMNS)))


def run_beam_ingest(opts: ingest.IngestOptions,
                    pipeline_args: Sequence[str] = ()) -> ingest.IngestSummary:
  """Discovers the studies and runs the Beam ingest (direct runner unless `pipeline_args` say
  otherwise, e.g. `--runner=DataflowRunner ...`). Not resumable: Beam retries failed work."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel

  start = time.monotonic()
  os.makedirs(opts.output, exist_ok=True)
  discovery = layouts.discover(opts.layout, opts.input, labels=opts.labels, reports=opts.reports,
                               site=opts.site, workers=opts.workers, limits=opts.limits)
  with beam.Pipeline(options=pipeline_options.PipelineOptions(list(pipeline_args))) as p:
    build_pipeline(p, discovery, opts)
  elapsed = time.monotonic() - start
  rows = ingest.read_manifest(os.path.join(opts.output, ingest.MANIFEST))
  used = sum(r["status"] == assemble.USED for r in rows)
  info = records.read_dataset_info(opts.output)
  counts = {s: i["num_records"] for s, i in info["splits"].items()}
  summary = ingest.IngestSummary(
      output=os.path.abspath(opts.output), num_studies=len(discovery.specs),
      converted=sum(counts.values()), resumed=0, skipped_studies=len(info["skipped"]),
      counts=counts, files_in=len(rows), files_used=used, files_skipped=len(rows) - used,
      elapsed_s=elapsed, studies_per_s=len(discovery.specs) / elapsed)
  logging.info("beam ingest: %d studies in %.1f s (%.2f studies/s); files: %d in = %d used + "
               "%d skipped", summary.num_studies, elapsed, summary.studies_per_s,
               summary.files_in, used, summary.files_skipped)
  return summary
