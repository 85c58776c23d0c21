"""DICOM archive -> study records: the per-study function, the file manifest, resumable runs.

`load_study(spec, ...)` (from `loading`, light to import in worker processes) is the per-study
function: read the study's files, assemble its cines, pseudonymise, and account for every file.
It runs in `records.build_dataset` workers here, and is what a distributed runner maps over
studies (`beam_pipeline`).

An ingest run writes, under `--output`:
  parts/part-NNNNN/            one `records.build_dataset` output per chunk of studies
  parts/part-NNNNN.done.json   the chunk's study pseudonyms: the resume done-list
  parts/part-NNNNN.manifest.csv
  dataset_info.json, {split}.index.json   the union of the parts, read by `records.open_split`
                               (shard paths point into parts/)
  manifest.csv                 every input file: file pseudonym, study pseudonym, series,
                               status (used/skipped), reason; files in = used + skipped
A rerun skips the studies of finished parts and converts the rest into new parts, so an
interrupted run resumes where it stopped (losing at most the part in progress). Before anything
is removed or written, the inputs and the output are checked (`cmr_jax.dicom.output`): a rerun
with another salt is refused, and a part holding a study whose input files changed (size,
modification time) is converted again.

Privacy: outputs and logs hold pseudonyms only. Input paths are pseudonymised too (`f-<hmac>`
of the path relative to the input), since folder and zip names carry Kaggle Ids, UK Biobank eids
or patient names; the optional `path_key` CSV maps them back for the data owner and is refused
inside the output folder. Report text and series names are scrubbed of the study's identifying
values (`pseudonym.scrub_text`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import loading
from cmr_jax.dicom import output as outputs

MANIFEST = outputs.MANIFEST
MANIFEST_COLUMNS = ("file", "study", "series", "status", "reason")
PARTS = outputs.PARTS
PART_NAME = outputs.PART_NAME
DONE_SUFFIX = outputs.DONE_SUFFIX
MANIFEST_SUFFIX = outputs.MANIFEST_SUFFIX
UsageProblem = outputs.UsageProblem
ROWS_DIR = ".rows"  # per-study file rows written by the workers of the part in progress
DEFAULT_CHUNK_STUDIES = loading.DEFAULT_CHUNK_STUDIES
# The per-study function and its rows live in `loading` (light imports for worker processes).
FileRow = loading.FileRow
LoadedStudy = loading.LoadedStudy
StudyLoader = loading.StudyLoader
load_study = loading.load_study
study_pseudonyms = loading.study_pseudonyms
file_pseudonym = loading.file_pseudonym
_read_rows = loading._read_rows  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class IngestOptions:
  """What an ingest run reads, how it converts, and where it writes.

  Attributes:
    layout: one of `layouts.LAYOUTS`.
    input: the input folder (or zip / DICOM file for the generic layout).
    output: the dataset folder.
    salt: pseudonymisation salt (see `pseudonym.resolve_salt`).
    labels: labels CSV (comma-separated list for Kaggle); "" for the layout's default/none.
    reports: reports CSV (generic layout).
    site: site name of the studies ("" for the layout name).
    external: put every study in the split "external" (an external test site).
    workers: worker processes (0: in this process).
    chunk_studies: studies per part (the unit of resumption).
    num_shards: shards per split within a part.
    preprocess: the stored geometry of the records.
    path_key: optional CSV (outside `output`) mapping file pseudonyms to input paths.
    overwrite: remove what an earlier ingest wrote in the output (`output.clear`: its names
      only) instead of resuming; other files stay.
    limits: what one input file may make the reader read and allocate (a file over a limit is
      skipped with the reason).
    fractions: (split, fraction) pairs by subject hash, summing to 1; a "calib" split holds
      studies for calibrating a fine-tuned model's prediction intervals (tools/calibrate.py).
  """

  layout: str
  input: str
  output: str
  salt: str
  labels: str = ""
  reports: str = ""
  site: str = ""
  external: bool = False
  workers: int = 0
  chunk_studies: int = DEFAULT_CHUNK_STUDIES
  num_shards: int = 1
  preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
  path_key: str = ""
  overwrite: bool = False
  limits: dicom_files.ReadLimits = dicom_files.ReadLimits()
  fractions: tuple[tuple[str, float], ...] = splits.DEFAULT_FRACTIONS


@dataclasses.dataclass
class IngestSummary:
  """What an ingest run did."""

  output: str
  num_studies: int  # found in the input
  converted: int  # studies converted in this run (records written)
  resumed: int  # studies already done by an earlier run
  skipped_studies: int  # studies without a record (unusable or duplicate), all runs
  counts: dict[str, int]  # records per split, all parts
  files_in: int
  files_used: int
  files_skipped: int
  elapsed_s: float
  studies_per_s: float  # studies read and converted per second in this run
  changed: int = 0  # studies converted again because their input files changed since
  cores: int = 1  # processes converting in this run: the workers (at most the usable CPUs)
  studies_per_s_per_core: float = math.nan  # studies_per_s / cores


def conversion_cores(workers: int) -> int:
  """The processes converting studies with `workers` worker processes: 1 in this process,
  else the workers, at most the CPUs this process may run on."""
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(workers, usable or 1))


def split_function(opts: IngestOptions) -> splits.SubjectSplitter:
  """The record -> split rule: subject-grouped by `opts.fractions`, or all "external" with
  `opts.external`."""
  return splits.SubjectSplitter(
      fractions=tuple((name, float(f)) for name, f in opts.fractions),
      external_sites=frozenset([opts.site or opts.layout]) if opts.external else frozenset())


def split_rule(opts: IngestOptions) -> dict[str, Any]:
  """What decides the studies' splits, recorded with each part: a resume must use the same."""
  return {"fractions": [[name, float(f)] for name, f in opts.fractions],
          "external": bool(opts.external)}


def mark_unconverted(rows: list[FileRow], *, failed: dict[str, str] | None = None,
                     duplicates: dict[str, str] | None = None,
                     skipped_cines: Sequence[str] = ()) -> list[FileRow]:
  """Marks the used files of studies (or cines) that got no record as skipped, with why.

  Args:
    rows: file rows of `load_study`.
    failed: reason by study pseudonym, for studies whose preprocessing failed.
    duplicates: the earlier study by study pseudonym, for studies with the same pixels.
    skipped_cines: preprocessing's messages for cines it left out
      ("study <id>, series <name>: <reason>").
  """
  failed, duplicates = failed or {}, duplicates or {}
  left_out = {}
  for message in skipped_cines:
    head, _, reason = message.partition(": ")
    study, _, cine = head.partition(", series ")
    left_out[(study.removeprefix("study "), cine)] = reason
  out = []
  for r in rows:
    reason = ""
    if r.study in failed:
      reason = f"study not converted: {failed[r.study]}"
    elif r.study in duplicates:
      reason = f"study not converted: same pixels as study {duplicates[r.study]}"
    elif (r.study, r.cine) in left_out:
      reason = f"cine left out by preprocessing: {left_out[(r.study, r.cine)]}"
    if reason and r.status == assemble.USED:
      r = dataclasses.replace(r, status=assemble.SKIPPED, reason=reason)
    out.append(r)
  return out


def _write_manifest(path: str, rows: Sequence[FileRow]) -> None:
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(MANIFEST_COLUMNS)
    for r in rows:
      writer.writerow([getattr(r, c) for c in MANIFEST_COLUMNS])
  os.replace(path + ".tmp", path)


def read_manifest(path: str) -> list[dict[str, str]]:
  """The rows of a manifest CSV."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _build_part(index: int, specs: Sequence[layouts.StudySpec], opts: IngestOptions,
                split_fn, fingerprints: dict[str, str]) -> records.BuildSummary:
  """Converts one chunk of studies into `parts/part-<index>` and marks it done (with the salt's
  and the studies' input fingerprints, `outputs.read_parts`)."""
  part = outputs.part_dir(opts.output, index)
  rows_dir = os.path.join(part, ROWS_DIR)
  os.makedirs(rows_dir, exist_ok=True)
  items, names = [], []
  for spec in specs:
    study_id, _ = study_pseudonyms(spec, opts.salt)
    names.append(study_id)
    items.append(records.BuildItem(study_id, StudyLoader(
        spec, opts.salt, opts.input, os.path.join(rows_dir, study_id + ".json"),
        min_frames=opts.preprocess.min_frames, limits=opts.limits)))
  summary = records.build_dataset(items, part, cfg=opts.preprocess, split_fn=split_fn,
                                  num_shards=opts.num_shards, num_workers=opts.workers)
  rows = []
  for spec, study_id in zip(specs, names):
    path = os.path.join(rows_dir, study_id + ".json")
    if os.path.exists(path):
      rows += _read_rows(path)
    else:  # the loader died before reporting (e.g. a worker crash): the files were not used
      rows += [FileRow(file_pseudonym(r, opts.input, opts.salt), study_id, "",
                       assemble.SKIPPED, "study not converted: loader failed") for r in spec.files]
  rows = mark_unconverted(rows, failed={s["item"]: s["reason"] for s in summary.skipped},
                          duplicates={d["item"]: d["duplicate_of"] for d in summary.duplicates},
                          skipped_cines=summary.skipped_cines)
  shutil.rmtree(rows_dir)
  _write_manifest(part + MANIFEST_SUFFIX, rows)
  outputs.write_json(part + DONE_SUFFIX, {
      "index": index, "studies": names, "preprocess": opts.preprocess.to_dict(),
      "salt": outputs.salt_fingerprint(opts.salt),
      "inputs": {s: fingerprints[s] for s in names}, "split_rule": split_rule(opts),
      "skipped": summary.skipped, "duplicates": summary.duplicates})
  return summary


@dataclasses.dataclass(frozen=True)
class Shard:
  """One written ArrayRecord shard of a dataset: its split, path and per-record metadata."""

  split: str
  path: str  # relative to the dataset folder
  index: list[dict]  # `records.record_metadata` of its records, in file order
  cine_path: str | None = None  # its per-cine shard (`records.CINE_SHARD_PATTERN`), if written
  layout: str = records.LAYOUT_WHOLE  # `records.LAYOUTS`: "cines" when its pixels are there only


def write_catalogue(output: str, shards: Sequence[Shard], cfg: preprocess.PreprocessConfig, *,
                    num_items: int, skipped: list, skipped_cines: list, duplicates: list,
                    extra: dict) -> dict[str, int]:
  """Writes `dataset_info.json` and `{split}.index.json` describing the given shards as one
  dataset readable by `records.open_split` (shard paths may point into sub-folders).

  Records with the same pixels in two shards are listed under duplicates (both kept: each
  shard's build deduplicated only its own records).

  Returns:
    Records per split.
  """
  by_split: dict[str, list[Shard]] = collections.defaultdict(list)
  for shard in shards:
    by_split[shard.split].append(shard)
  for name in os.listdir(output):
    if name.endswith(records.INDEX_SUFFIX):
      os.remove(os.path.join(output, name))
  splits_info, label_stats = {}, {}
  first_of_checksum: dict[str, str] = {}
  duplicates = list(duplicates)
  for split in sorted(by_split):
    index = [m for shard in by_split[split] for m in shard.index]
    with open(os.path.join(output, split + records.INDEX_SUFFIX), "w") as f:
      json.dump(index, f, indent=1, allow_nan=False)
    splits_info[split] = {
        "files": [s.path for s in by_split[split]],
        "shard_lengths": [len(s.index) for s in by_split[split]],
        "num_records": len(index),
        "sites": dict(sorted(collections.Counter(m["site"] for m in index).items())),
        "subjects": len({m["subject_id"] for m in index}),
        "labelled": sum(m["lvef"] is not None for m in index)}
    has_cines = all(s.cine_path for s in by_split[split])
    if has_cines:  # pre-training reads single cines
      splits_info[split]["cine_files"] = [s.cine_path for s in by_split[split]]
    # Shards of either layout with per-cine shards read the same from those: "cines" then.
    cines_only = [s.path for s in by_split[split] if s.layout == records.LAYOUT_CINES]
    if cines_only and not has_cines:
      raise ValueError(f"split {split}: shards without per-cine shards cannot join {cines_only[0]}"
                       ", whose pixels are in its per-cine shard only: rebuild with --overwrite")
    splits_info[split]["layout"] = records.LAYOUT_CINES if cines_only else records.LAYOUT_WHOLE
    label_stats[split] = records.label_stats(index)
    for m in index:
      if m["checksum"] in first_of_checksum:
        duplicates.append({"item": m["study_id"], "study_id": m["study_id"],
                           "duplicate_of": first_of_checksum[m["checksum"]],
                           "note": "in another shard: kept"})
      first_of_checksum.setdefault(m["checksum"], m["study_id"])
  with open(os.path.join(output, records.DATASET_INFO), "w") as f:
    json.dump({"builder_version": records.BUILDER_VERSION,
               "record_format": records.RECORD_FORMAT, "preprocess": cfg.to_dict(),
               "num_items": num_items, "splits": splits_info, "label_stats": label_stats,
               "skipped": skipped, "skipped_cines": skipped_cines, "duplicates": duplicates,
               **extra}, f, indent=1, allow_nan=False)
  return {s: i["num_records"] for s, i in splits_info.items()}


def _merge_parts(output: str, part_indices: Sequence[int], cfg: preprocess.PreprocessConfig,
                 extra: dict) -> dict[str, int]:
  """Describes the union of the parts as one dataset (`write_catalogue`)."""
  shards, skipped, duplicates, skipped_cines = [], [], [], []
  num_items = 0
  for index in part_indices:
    part = outputs.part_dir(output, index)
    info = records.read_dataset_info(part)
    num_items += info["num_items"]
    skipped += info["skipped"]
    duplicates += info["duplicates"]
    skipped_cines += info["skipped_cines"]
    rel = os.path.relpath(part, output)
    for split, split_info in info["splits"].items():
      metadata = records.load_index(part, split)
      starts = np.cumsum([0] + split_info["shard_lengths"])
      cine_files = split_info.get("cine_files", [None] * len(split_info["files"]))
      layout = records.split_layout(part, split, split_info)
      shards += [Shard(split, os.path.join(rel, name), metadata[starts[i]:starts[i + 1]],
                       cine and os.path.join(rel, cine), layout)
                 for i, (name, cine) in enumerate(zip(split_info["files"], cine_files))]
  return write_catalogue(
      output, shards, cfg, num_items=num_items, skipped=skipped, skipped_cines=skipped_cines,
      duplicates=duplicates, extra={"parts": [PART_NAME.format(index=i) for i in part_indices],
                                    **extra})


def _write_path_key(path: str, discovery: layouts.Discovery, opts: IngestOptions) -> None:
  """The data owner's private map from file pseudonyms back to input paths."""
  refs = [r for spec in discovery.specs for r in spec.files] + [r for r, _ in discovery.orphans]
  with open(path, "w", newline="", errors="surrogateescape") as f:  # names as their bytes
    writer = csv.writer(f)
    writer.writerow(["file", "path"])
    for ref in refs:
      writer.writerow([file_pseudonym(ref, opts.input, opts.salt), ref.relative(opts.input)])


def _check(opts: IngestOptions, output: str) -> tuple[layouts.Discovery, list[outputs.Part],
                                                     dict[str, str], bool]:
  """Every check of the inputs and the output, done before anything there is removed or written.

  Returns:
    (the input's studies, the finished parts to resume, the input fingerprint by study
    pseudonym, whether the output holds an earlier ingest's output).
  """
  outputs.check_input(opts.layout, opts.input, labels=opts.labels, reports=opts.reports,
                      path_key=opts.path_key, output=output)
  existing = outputs.check_output(output, overwrite=opts.overwrite)
  finished = [] if opts.overwrite else outputs.read_parts(output, opts.preprocess, opts.salt,
                                                              split_rule(opts))
  try:
    discovery = layouts.discover(opts.layout, opts.input, labels=opts.labels,
                                 reports=opts.reports, site=opts.site, workers=opts.workers,
                                 limits=opts.limits)
  except ValueError as e:  # the labels or reports CSV, the layout's options
    raise UsageProblem(dicom_files.printable(str(e))) from None
  if not discovery.specs:
    reasons = collections.Counter(r for _, r in discovery.orphans).most_common(3)
    what = (f"no studies found below --input with --layout={opts.layout} ("
            + ("; ".join(f"{n} files: {r}" for r, n in reasons) or "no files") + ")")
    if existing or not discovery.orphans:  # (the input path is named on stderr, not in logs)
      raise UsageProblem(what.replace("--input", f"--input {dicom_files.printable(opts.input)}")
                         + (f"; {dicom_files.printable(output)} left as it was" if existing
                            else ""))
    logging.warning("%s: check the layout and the input folder (reasons in %s)", what, MANIFEST)
  fingerprints = {study_pseudonyms(s, opts.salt)[0]: outputs.inputs_fingerprint(
      s, opts.input, opts.salt) for s in discovery.specs}
  return discovery, finished, fingerprints, existing


def run_ingest(opts: IngestOptions) -> IngestSummary:
  """Converts a DICOM archive into a records dataset with a manifest; resumable.

  Inputs and output are checked before anything in the output is removed or written
  (`cmr_jax.dicom.output`). A resumed study whose input files changed is converted again with
  the other studies of its part, whose old records are removed.

  Raises:
    UsageProblem (a ValueError): for bad options: a missing input or CSV, no study in the input
      (when the manifest cannot say why, or the output holds a dataset), a path key inside the
      output, an output that is not an ingest's, one made with another preprocessing config or
      another salt.
  """
  start = time.monotonic()
  output = os.path.abspath(opts.output)
  discovery, finished, fingerprints, existing = _check(opts, output)
  # The checks passed: from here on the output is written.
  if opts.overwrite and os.path.isdir(output):
    outputs.clear(output)
  os.makedirs(os.path.join(output, PARTS), exist_ok=True)
  if opts.path_key:
    _write_path_key(opts.path_key, discovery, opts)
  stale = outputs.stale_parts(finished, fingerprints)
  changed = sum(fingerprints.get(s, "") not in ("", p.inputs.get(s)) for p in stale
                for s in p.studies)
  if stale:
    logging.warning("the input files of %d studies converted by an earlier run changed: their "
                    "%d parts (%d studies in the input) are converted again", changed,
                    len(stale), sum(s in fingerprints for p in stale for s in p.studies))
  next_index = max((p.index for p in finished), default=-1) + 1
  finished = [p for p in finished if p not in stale]
  outputs.remove_parts(output, [p.index for p in finished])  # interrupted and stale parts
  done = {s for p in finished for s in p.studies}
  todo = [s for s in discovery.specs if study_pseudonyms(s, opts.salt)[0] not in done]
  resumed = len(discovery.specs) - len(todo)
  if resumed:
    logging.info("resuming: %d of %d studies already converted in %d parts", resumed,
                 len(discovery.specs), len(finished))
  split_fn = split_function(opts)
  opts = dataclasses.replace(opts, output=output)
  chunks = [todo[i:i + opts.chunk_studies] for i in range(0, len(todo), opts.chunk_studies)]
  convert_start = time.monotonic()
  converted = processed = 0
  for k, chunk in enumerate(chunks):
    summary = _build_part(next_index + k, chunk, opts, split_fn, fingerprints)
    converted += summary.num_written
    processed += len(chunk)
    elapsed = time.monotonic() - convert_start
    rate = processed / max(elapsed, 1e-9)
    logging.info("part %d/%d done: %d/%d studies this run (%.2f studies/s, ETA %.0f s)", k + 1,
                 len(chunks), processed, len(todo), rate, (len(todo) - processed) / rate)
  convert_s = time.monotonic() - convert_start
  part_indices = sorted([p.index for p in finished]
                        + [next_index + k for k in range(len(chunks))])
  rows = [FileRow(file_pseudonym(r, opts.input, opts.salt), "", "", assemble.SKIPPED, reason)
          for r, reason in discovery.orphans]
  with_records: set[str] = set()
  for index in part_indices:
    part_rows = read_manifest(outputs.part_dir(output, index) + MANIFEST_SUFFIX)
    rows += [FileRow(**r) for r in part_rows]
    with_records.update(r["study"] for r in part_rows if r["status"] == assemble.USED)
  gone = len(with_records - set(fingerprints))
  if gone:
    logging.warning("%d studies converted by an earlier run are no longer in the input: their "
                    "records are kept (use --overwrite to rebuild)", gone)
  _write_manifest(os.path.join(output, MANIFEST), rows)
  used = sum(r.status == assemble.USED for r in rows)
  counts = _merge_parts(output, part_indices, opts.preprocess, {"ingest": {
      "layout": opts.layout, "studies_found": len(discovery.specs), "files_in": len(rows),
      "files_used": used, "files_skipped": len(rows) - used,
      "salt_fingerprint": outputs.salt_fingerprint(opts.salt)}})
  elapsed = time.monotonic() - start
  result = IngestSummary(
      output=output, num_studies=len(discovery.specs), converted=converted, resumed=resumed,
      skipped_studies=len(set(fingerprints) - with_records), counts=counts,
      files_in=len(rows), files_used=used, files_skipped=len(rows) - used, elapsed_s=elapsed,
      studies_per_s=len(todo) / convert_s if todo and convert_s > 0 else math.nan,
      changed=changed, cores=conversion_cores(opts.workers))
  result.studies_per_s_per_core = result.studies_per_s / result.cores
  if result.files_in != discovery.num_files:
    logging.warning("the manifest accounts for %d files but the input now has %d: the input "
                    "changed since an earlier run (use --overwrite to rebuild)", result.files_in,
                    discovery.num_files)
  logging.info("ingested %d studies (%d converted now, %d resumed, %d converted again as "
               "their files changed, %d without a record) in %.1f s, %.2f studies/s (%.2f per "
               "core, %d cores); records per split %s", result.num_studies, converted, resumed,
               changed, result.skipped_studies, elapsed, result.studies_per_s,
               result.studies_per_s_per_core, result.cores, counts)
  logging.info("files: %d in = %d used + %d skipped (reasons in %s)", result.files_in,
               result.files_used, result.files_skipped, os.path.join(output, MANIFEST))
  return result
