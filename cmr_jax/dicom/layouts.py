"""Where the studies of a DICOM archive are, and their labels: Kaggle, UK Biobank, generic.

Discovery turns an input path into `StudySpec`s (the files of one study, its subject, visit,
labels and report) plus the input files that belong to no study, each with a reason, so that
every input file is accounted for. Specs hold raw identifiers (Kaggle Ids, UK Biobank eids,
StudyInstanceUIDs, paths): they live in memory only and are pseudonymised by `ingest`.

- Kaggle Data Science Bowl: `.../<Id>/study/<series>/*.dcm`; labels from `train.csv` /
  `validate.csv` (Id, Systole, Diastole in mL) and `solution.csv` (`<Id>_Systole`,
  `<Id>_Diastole`, Volume): LVEF = 100 (D - S) / D. One study per Id.
- UK Biobank: `{eid}_{field}_{instance}_0.zip`; the 20208 (long axis) and 20209 (short axis)
  zips of one eid and instance form one study; instance 2 is visit 0, instance 3 the repeat
  visit 1. Labels from a participant CSV with `eid` and `22420-{2|3}.0` (LVEF), 22421 (EDV),
  22422 (ESV). Each zip's `manifest.csv` (or `manifest.cvs`) gives series descriptions.
- Generic: one study per StudyInstanceUID anywhere below the root (folders, zips, or a single
  study folder or zip; files without the UID group by PatientID and study date and time);
  optional labels CSV keyed by study folder name, StudyInstanceUID or accession (`lvef`,
  optional `edv`, `esv`), and reports CSV keyed by accession or StudyInstanceUID (`report` or
  `text`). A subject's studies are ordered by study date: visit 0, 1, ...
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import re
import time
from collections.abc import Sequence

from absl import logging

from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import parse

KAGGLE = "kaggle"
UKBB = "ukbb"
GENERIC = "generic"
LAYOUTS = (KAGGLE, UKBB, GENERIC)
KAGGLE_LABEL_FILES = ("train.csv", "validate.csv", "solution.csv")
KAGGLE_LABEL_SEARCH_DEPTH = 2  # look for Kaggle label CSVs this many folders above the input
KAGGLE_STUDY_FOLDER = "study"
UKBB_ZIP = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.zip$")
UKBB_LAX_FIELD = "20208"
UKBB_SAX_FIELD = "20209"
UKBB_FIELDS = (UKBB_LAX_FIELD, UKBB_SAX_FIELD)
UKBB_FIRST_INSTANCE = 2
UKBB_LVEF, UKBB_EDV, UKBB_ESV = "22420", "22421", "22422"
UKBB_MANIFESTS = ("manifest.csv", "manifest.cvs")
# `Aug 30, 2015` in UK Biobank manifests: the comma breaks CSV parsing.
_UKBB_MANIFEST_DATE = re.compile(r"\b([A-Z][a-z]{2}) (\d{1,2}), (\d{4})\b")
GENERIC_LABEL_KEYS = ("study", "folder", "study_uid", "studyinstanceuid", "accession",
                      "accessionnumber")
GENERIC_REPORT_KEYS = ("accession", "accessionnumber", "study_uid", "studyinstanceuid")
GENERIC_REPORT_TEXT = ("report", "text", "report_text")
NO_STUDY_UID = "no-study-uid:"  # key prefix of studies whose files carry no StudyInstanceUID
SCAN_FILES_PER_TASK = 256
SCAN_LOG_EVERY_S = 10.0
NAN = math.nan


@dataclasses.dataclass
class StudySpec:
  """One study to read. Holds raw identifiers: memory only, never written out.

  Attributes:
    layout: the layout it was found by.
    key: the study's identifier in its layout (Kaggle Id, `<eid>_<instance>`, StudyInstanceUID).
    subject_key: the subject's identifier (Kaggle Id, eid, PatientID).
    files: the study's files, grouped by zip archive.
    site: the acquisition site / protocol family name.
    visit: 0 for a subject's first scan, 1 for the next, ...
    lvef, edv, esv: labels (nan when unknown).
    report: report text (not yet scrubbed of identifiers).
    study_uid: when set, only files of this StudyInstanceUID belong to the study.
    hints: series names from outside the files (zip manifests), by file.
  """

  layout: str
  key: str
  subject_key: str
  files: list[dicom_files.FileRef]
  site: str
  visit: int = 0
  lvef: float = NAN
  edv: float = NAN
  esv: float = NAN
  report: str = ""
  study_uid: str = ""
  hints: dict[dicom_files.FileRef, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Discovery:
  """The studies of an input and the input files that belong to none of them."""

  layout: str
  root: str
  specs: list[StudySpec]
  orphans: list[tuple[dicom_files.FileRef, str]]  # (file, why it belongs to no study)

  @property
  def num_files(self) -> int:
    return sum(len(s.files) for s in self.specs) + len(self.orphans)


def _float(value) -> float:
  try:
    return float(value) if value not in (None, "") else NAN
  except ValueError:
    return NAN


def _read_csv(path: str) -> list[dict[str, str]]:
  """Rows of a CSV with lower-cased, stripped column names."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.DictReader(f))
  return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in rows]


def _ef(edv: float, esv: float) -> float:
  return 100.0 * (edv - esv) / edv if edv > 0 and math.isfinite(esv) else NAN


# ---------------------------------------------------------------------------------------------
# Kaggle.


def read_kaggle_labels(paths: Sequence[str]) -> dict[str, tuple[float, float, float]]:
  """Kaggle labels by Id: (lvef, edv, esv) from train/validate (`Id,Systole,Diastole`) or
  solution (`<Id>_Systole`/`<Id>_Diastole`, `Volume`) CSVs."""
  volumes: dict[str, dict[str, float]] = collections.defaultdict(dict)
  for path in paths:
    for row in _read_csv(path):
      if "systole" in row and "diastole" in row:
        volumes[row["id"]].update(systole=_float(row["systole"]),
                                  diastole=_float(row["diastole"]))
      elif "volume" in row and "_" in row.get("id", ""):
        study_id, phase = row["id"].rsplit("_", 1)
        volumes[study_id][phase.lower()] = _float(row["volume"])
      else:
        raise ValueError(f"{path}: not a Kaggle label file (expected Id,Systole,Diastole or "
                         f"Id,Volume columns, got {sorted(row)})")
  return {k: (_ef(v.get("diastole", NAN), v.get("systole", NAN)), v.get("diastole", NAN),
              v.get("systole", NAN)) for k, v in volumes.items()}


def find_kaggle_label_files(root: str) -> list[str]:
  """Kaggle label CSVs in the input folder or up to `KAGGLE_LABEL_SEARCH_DEPTH` folders above."""
  found, folder = [], os.path.abspath(root)
  for _ in range(KAGGLE_LABEL_SEARCH_DEPTH + 1):
    found += [os.path.join(folder, n) for n in KAGGLE_LABEL_FILES
              if os.path.isfile(os.path.join(folder, n))]
    folder = os.path.dirname(folder)
  return found


def discover_kaggle(root: str, *, label_files: Sequence[str] | None = None,
                    site: str = KAGGLE) -> Discovery:
  """Studies of a Kaggle Data Science Bowl tree: every `<Id>/study` folder below `root`.

  Args:
    root: a split folder (`train/train`), a folder above it, or one `<Id>` folder.
    label_files: label CSVs; default: `find_kaggle_label_files(root)`.
    site: site name of the studies.
  """
  label_files = find_kaggle_label_files(root) if label_files is None else label_files
  labels = read_kaggle_labels(label_files)
  files, problems = dicom_files.list_input_files(root)
  by_id: dict[str, list[dicom_files.FileRef]] = collections.defaultdict(list)
  orphans = list(problems)
  root_abs = os.path.abspath(root)
  for ref in files:
    parts = os.path.relpath(ref.path, os.path.dirname(root_abs)).split(os.sep)
    parts += ref.member.split("/") if ref.member else []  # e.g. inside Kaggle's train.zip
    where = [i for i in range(1, len(parts) - 1)
             if parts[i] == KAGGLE_STUDY_FOLDER and parts[i - 1].isdigit()]
    if where:
      by_id[parts[where[0] - 1]].append(ref)
    else:
      orphans.append((ref, f"not inside a <Id>/{KAGGLE_STUDY_FOLDER} folder"))
  specs = []
  for study_id in sorted(by_id, key=int):
    lvef, edv, esv = labels.get(study_id, (NAN, NAN, NAN))
    specs.append(StudySpec(layout=KAGGLE, key=study_id, subject_key=study_id,
                           files=by_id[study_id], site=site, lvef=lvef, edv=edv, esv=esv))
  logging.info("Kaggle layout: %d studies (%d labelled from %d label files), %d other files",
               len(specs), sum(math.isfinite(s.lvef) for s in specs), len(label_files),
               len(orphans))
  return Discovery(KAGGLE, root, specs, orphans)


# ---------------------------------------------------------------------------------------------
# UK Biobank.


def parse_ukbb_manifest(text: str) -> dict[str, str]:
  """Series description by file name from a UK Biobank zip manifest (dates with commas fixed)."""
  rows = _read_csv_text(_UKBB_MANIFEST_DATE.sub(r"\1 \2 \3", text))
  out = {}
  for row in rows:
    description = row.get("series discription") or row.get("series description") or ""
    if row.get("filename"):
      out[row["filename"]] = description
  return out


def _read_csv_text(text: str) -> list[dict[str, str]]:
  rows = csv.DictReader(io.StringIO(text))
  return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in rows]


def read_ukbb_labels(path: str) -> dict[tuple[str, int], tuple[float, float, float]]:
  """UK Biobank labels by (eid, instance): (LVEF %, EDV mL, ESV mL) from fields 22420-22422."""
  labels = {}
  for row in _read_csv(path):
    if "eid" not in row:
      raise ValueError(f"{path}: no 'eid' column; expected eid and 22420-2.0 style columns")
    for instance in (UKBB_FIRST_INSTANCE, UKBB_FIRST_INSTANCE + 1):
      values = tuple(_float(row.get(f"{field}-{instance}.0"))
                     for field in (UKBB_LVEF, UKBB_EDV, UKBB_ESV))
      if any(math.isfinite(v) for v in values):
        labels[(row["eid"], instance)] = values
  return labels


def is_ukbb_manifest(ref: dicom_files.FileRef) -> bool:
  """Whether a file is a UK Biobank zip's manifest (a member named `UKBB_MANIFESTS`), which is
  not DICOM and belongs beside the zip's images."""
  return bool(ref.member) and os.path.basename(ref.member).lower() in UKBB_MANIFESTS


def discover_ukbb(root: str, *, labels_path: str = "", site: str = UKBB,
                  limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> Discovery:
  """Studies of a folder of UK Biobank bulk zips: one per (eid, instance) with 20208/20209 zips
  (`limits`: the zip manifests are read within them)."""
  labels = read_ukbb_labels(labels_path) if labels_path else {}
  files, problems = dicom_files.list_input_files(root)
  orphans = list(problems)
  groups: dict[tuple[str, int], list[dicom_files.FileRef]] = collections.defaultdict(list)
  hints: dict[dicom_files.FileRef, str] = {}
  for zip_path, members in _by_archive(files):
    match = UKBB_ZIP.match(os.path.basename(zip_path))
    if not match or not members[0].member:
      orphans += [(r, "not in a UK Biobank bulk zip ({eid}_{field}_{instance}_0.zip)")
                  for r in members]
      continue
    eid, field, instance = match.group(1), match.group(2), int(match.group(3))
    if field not in UKBB_FIELDS:
      orphans += [(r, f"UK Biobank field {field} not used (cines are in fields "
                   f"{' and '.join(UKBB_FIELDS)})") for r in members]
      continue
    for ref in members:
      if is_ukbb_manifest(ref):
        orphans.append((ref, "zip manifest (read for series descriptions)"))
        hints.update(_manifest_hints(ref, members, limits))
      else:
        groups[(eid, instance)].append(ref)
  specs = []
  for (eid, instance), refs in sorted(groups.items()):
    lvef, edv, esv = labels.get((eid, instance), (NAN, NAN, NAN))
    specs.append(StudySpec(
        layout=UKBB, key=f"{eid}_{instance}", subject_key=eid, files=refs, site=site,
        visit=instance - UKBB_FIRST_INSTANCE, lvef=lvef, edv=edv, esv=esv,
        hints={r: hints[r] for r in refs if r in hints}))
  logging.info("UK Biobank layout: %d studies of %d subjects (%d labelled), %d other files",
               len(specs), len({s.subject_key for s in specs}),
               sum(math.isfinite(s.lvef) for s in specs), len(orphans))
  return Discovery(UKBB, root, specs, orphans)


def _by_archive(files: Sequence[dicom_files.FileRef]):
  """(path, files) groups: the members of each zip, or single plain files."""
  groups: dict[str, list[dicom_files.FileRef]] = collections.defaultdict(list)
  for ref in files:
    groups[ref.path].append(ref)
  return sorted(groups.items())


def _manifest_hints(manifest: dicom_files.FileRef, members: Sequence[dicom_files.FileRef],
                    limits: dicom_files.ReadLimits) -> dict[dicom_files.FileRef, str]:
  """Series descriptions from a zip's manifest, by member; {} when it cannot be parsed."""
  try:
    with dicom_files.open_zip(manifest.path) as zf:
      text = dicom_files.read_member(zf, manifest.member, limits).decode("utf-8",
                                                                         errors="replace")
    by_name = parse_ukbb_manifest(text)
  except (*dicom_files.ZIP_ERRORS, csv.Error) as e:
    logging.warning("a UK Biobank zip manifest could not be read (%s); using DICOM names only",
                    type(e).__name__)
    return {}
  return {r: by_name[os.path.basename(r.member)] for r in members
          if os.path.basename(r.member) in by_name}


# ---------------------------------------------------------------------------------------------
# Generic archives.


def _scan_chunk(refs: list[dicom_files.FileRef],
                limits: dicom_files.ReadLimits) -> list[parse.HeaderSummary]:
  return [parse.scan_header(r, limits) for r in refs]


def scan_headers(files: Sequence[dicom_files.FileRef], *, workers: int = 0,
                 log_every_s: float = SCAN_LOG_EVERY_S,
                 limits: dicom_files.ReadLimits = dicom_files.ReadLimits()
                 ) -> list[parse.HeaderSummary]:
  """Reads every file's header (no pixel data), over `workers` processes, logging progress;
  a file over `limits` gets its reason instead."""
  chunks = [list(files[i:i + SCAN_FILES_PER_TASK])
            for i in range(0, len(files), SCAN_FILES_PER_TASK)]
  scan_chunk = functools.partial(_scan_chunk, limits=limits)
  out: list[parse.HeaderSummary] = []
  start = last = time.monotonic()

  def progress():
    nonlocal last
    now = time.monotonic()
    if now - last >= log_every_s or len(out) == len(files):
      rate = len(out) / max(now - start, 1e-9)
      logging.info("scanned %d/%d file headers (%.0f files/s, ETA %.0f s)", len(out), len(files),
                   rate, (len(files) - len(out)) / max(rate, 1e-9))
      last = now

  if workers <= 0 or len(chunks) <= 1:
    for chunk in chunks:
      out += scan_chunk(chunk)
      progress()
    return out
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    for result in pool.map(scan_chunk, chunks):
      out += result
      progress()
  return out


def _keyed_rows(path: str, key_columns: Sequence[str], what: str) -> tuple[list[str],
                                                                             list[dict]]:
  rows = _read_csv(path)
  keys = [k for k in key_columns if rows and k in rows[0]]
  if rows and not keys:
    raise ValueError(f"{path}: a {what} CSV needs one of the columns {', '.join(key_columns)}; "
                     f"it has {', '.join(sorted(rows[0]))}")
  return keys, rows


def read_generic_labels(path: str) -> dict[str, tuple[float, float, float]]:
  """(lvef, edv, esv) by every key value found (study folder, StudyInstanceUID, accession)."""
  keys, rows = _keyed_rows(path, GENERIC_LABEL_KEYS, "labels")
  if rows and "lvef" not in rows[0]:
    raise ValueError(f"{path}: a labels CSV needs an 'lvef' column (and optional edv, esv)")
  out = {}
  for row in rows:
    edv, esv = _float(row.get("edv")), _float(row.get("esv"))
    lvef = _float(row["lvef"])
    values = (lvef if math.isfinite(lvef) else _ef(edv, esv), edv, esv)
    for key in keys:
      if row[key]:
        out[row[key]] = values
  return out


def read_generic_reports(path: str) -> dict[str, str]:
  """Report text by accession or StudyInstanceUID."""
  keys, rows = _keyed_rows(path, GENERIC_REPORT_KEYS, "reports")
  text_columns = [c for c in GENERIC_REPORT_TEXT if rows and c in rows[0]]
  if rows and not text_columns:
    raise ValueError(f"{path}: a reports CSV needs a column named one of "
                     f"{', '.join(GENERIC_REPORT_TEXT)}")
  return {row[k]: row[text_columns[0]] for row in rows for k in keys if row[k]}


def discover_generic(root: str, *, labels_path: str = "", reports_path: str = "",
                     site: str = GENERIC, workers: int = 0,
                     limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> Discovery:
  """One study per StudyInstanceUID below `root` (a folder, a zip, or one file); headers are
  read within `limits`."""
  labels = read_generic_labels(labels_path) if labels_path else {}
  reports = read_generic_reports(reports_path) if reports_path else {}
  files, problems = dicom_files.list_input_files(root)
  orphans = list(problems)
  studies: dict[str, list[parse.HeaderSummary]] = collections.defaultdict(list)
  for header in scan_headers(files, workers=workers, limits=limits):
    if header.reason:
      orphans.append((header.ref, header.reason))
    else:
      studies[_study_key(header)].append(header)
  # A subject's visits in order of study date and time.
  dates: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for uid, headers in studies.items():
    dates[headers[0].patient_id or uid].append((headers[0].study_datetime, uid))
  visit = {uid: i for entries in dates.values() for i, (_, uid) in enumerate(sorted(entries))}
  specs = []
  for uid, headers in sorted(studies.items()):
    refs = [h.ref for h in headers]
    accession = headers[0].accession
    label_keys = [uid, accession] + _folder_names(root, refs)
    lvef, edv, esv = next((labels[k] for k in label_keys if k and k in labels), (NAN, NAN, NAN))
    specs.append(StudySpec(
        layout=GENERIC, key=uid, subject_key=headers[0].patient_id or uid, files=refs,
        site=site, visit=visit[uid], lvef=lvef, edv=edv, esv=esv,
        report=(reports.get(accession) if accession else None) or reports.get(uid, ""),
        study_uid="" if uid.startswith(NO_STUDY_UID) else uid))
  logging.info("generic layout: %d studies of %d subjects (%d labelled, %d with reports), "
               "%d other files", len(specs), len({s.subject_key for s in specs}),
               sum(math.isfinite(s.lvef) for s in specs), sum(bool(s.report) for s in specs),
               len(orphans))
  return Discovery(GENERIC, root, specs, orphans)


def _study_key(header: parse.HeaderSummary) -> str:
  """The study a file belongs to: its StudyInstanceUID. Files without one (some exporters and
  simulators) group by PatientID and study date and time, which makes all such files of an
  anonymous input one study."""
  if header.study_uid:
    return header.study_uid
  return f"{NO_STUDY_UID}{header.patient_id}|{header.study_datetime}"


def _folder_names(root: str, refs: Sequence[dicom_files.FileRef]) -> list[str]:
  """Names a study may be labelled by: the folders holding all its files, deepest first, up to
  the input itself, and the name (without .zip) of the zip holding them all."""
  root_abs = os.path.abspath(root)
  paths = {os.path.abspath(r.path) for r in refs}
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths if dicom_files.is_zip(p)][:1]
  names = names if len(paths) == 1 else []
  folder = os.path.commonpath(list(paths))
  if not os.path.isdir(folder):
    folder = os.path.dirname(folder)
  while True:
    names.append(os.path.basename(folder))
    if len(folder) <= len(root_abs) or folder == os.path.dirname(folder):
      return names
    folder = os.path.dirname(folder)


def discover(layout: str, root: str, *, labels: str = "", reports: str = "", site: str = "",
             workers: int = 0,
             limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> Discovery:
  """Finds the studies of `root` in one of `LAYOUTS`.

  Args:
    layout: "kaggle", "ukbb" or "generic".
    root: the input folder (or zip / file for the generic layout).
    labels: labels CSV path(s), comma-separated for Kaggle (default: found next to the data).
    reports: reports CSV (generic layout only).
    site: site name of the studies (default: the layout name).
    workers: processes for header scanning (generic layout).
    limits: what one file may make discovery read (generic headers, UK Biobank manifests).

  Raises:
    ValueError: for an unknown layout, a missing input, or options the layout does not take.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
  if not os.path.exists(root):
    raise ValueError(f"input {root} does not exist")
  if reports and layout != GENERIC:
    raise ValueError("reports are read only with the generic layout")
  site = site or layout
  if layout == KAGGLE:
    files = [p for p in labels.split(",") if p] if labels else None
    return discover_kaggle(root, label_files=files, site=site)
  if layout == UKBB:
    return discover_ukbb(root, labels_path=labels, site=site, limits=limits)
  return discover_generic(root, labels_path=labels, reports_path=reports, site=site,
                          workers=workers, limits=limits)
