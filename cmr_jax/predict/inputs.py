"""Inputs to predict from: DICOM studies read and preprocessed as ingestion does, or records.

Each input (a study folder, a zip, a folder holding several studies, one DICOM file or a
DICOMDIR) is read the way ingestion reads it: studies found by StudyInstanceUID
(`layouts.discover`), files read and pseudonymised (`ingest.load_study`), cines preprocessed as
the model's training data was (`inference.Predictor.preprocess`). A study that cannot be read
gets a `Prepared` with the reason instead of a record, and the others carry on. Quality warnings
come from `cmr_jax.data.quality` plus what reading found (files skipped, views from anatomy...).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import traceback
from collections.abc import Iterator

from absl import logging

from cmr_jax.data import preprocess
from cmr_jax.data import quality
from cmr_jax.data import records
from cmr_jax.data import types
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse

DICOMDIR = "DICOMDIR"


@dataclasses.dataclass
class Prepared:
  """A study ready to score (`record` set) or one that could not be read (`error` set)."""

  input: str  # the input path (or dataset split) as given (`files.printable`)
  study: str = ""  # the study's pseudonym
  record: types.StudyRecord | None = None
  warnings: list[quality.QualityWarning] = dataclasses.field(default_factory=list)
  error: str = ""
  # Where below `input` the study's files lie (their common folder, "." for the input itself):
  # only for tools/predict.py --links, never in rows or logs (folder names may name patients).
  location: str = ""


def _files(n: int) -> str:
  return f"{n} file{'' if n == 1 else 's'}"


def _counts(counter: collections.Counter) -> str:
  """'3 files: reason; 1 file: other reason', most common first."""
  return "; ".join(f"{_files(n)}: {reason}" for reason, n in counter.most_common())


def _error_text(e: Exception) -> str:
  """An exception for a row: the message of expected errors, only the type of others (whose
  messages may quote file contents)."""
  if isinstance(e, (ValueError, OSError)):
    return f"{type(e).__name__}: {e}"
  logging.error("unexpected %s at\n%s", type(e).__name__,
                "".join(traceback.format_tb(e.__traceback__)))
  return f"unexpected {type(e).__name__} (a bug: please report it with the log)"


def _location(root: str, spec: layouts.StudySpec) -> str:
  """The folder below `root` (zips as `<zip>/<folder>`) that holds all of a study's files."""
  folders = [os.path.dirname(f.relative(root)) for f in spec.files]
  common = os.path.commonpath(folders) if folders and all(folders) else ""
  return dicom_files.printable(common or ".")


def _prepare_spec(path: str, root: str, spec: layouts.StudySpec,
                  cfg: preprocess.PreprocessConfig, salt: str,
                  common: list[quality.QualityWarning],
                  limits: dicom_files.ReadLimits) -> Prepared:
  """Reads, checks and preprocesses one study discovered below `root`; never raises."""
  study_id, _ = ingest.study_pseudonyms(spec, salt)
  out = Prepared(dicom_files.printable(path), study_id, warnings=list(common),
                 location=_location(root, spec))
  loaded = ingest.load_study(spec, salt=salt, root=root, min_frames=cfg.min_frames,
                             limits=limits)
  if loaded.study is None:
    out.error = loaded.reason
    return out
  skipped = collections.Counter(r.reason for r in loaded.rows if r.status == assemble.SKIPPED)
  if skipped:
    out.warnings.append(quality.QualityWarning(
        "files_skipped", f"{sum(skipped.values())} of {_files(len(loaded.rows))} not used "
        f"({_counts(skipped)})"))
  out.warnings += [quality.QualityWarning("views_from_anatomy", note) for note in loaded.notes]
  out.warnings += [quality.QualityWarning("view_name_conflict", text) for text in loaded.conflicts]
  left_out: list[str] = []
  image_centred: list[str] = []
  unoriented: list[str] = []
  try:
    record = preprocess.preprocess_study(loaded.study, cfg, skipped=left_out,
                                         image_centred=image_centred, unoriented=unoriented)
    out.warnings += (quality.source_warnings(loaded.study)
                     + quality.crop_warnings(image_centred) + quality.layout_warnings(unoriented))
  # One study's failure must not stop the others.
  except Exception as e:  # pylint: disable=broad-except
    out.error = _error_text(e)
    return out
  if left_out:  # "study <id>, series <name>: <reason>"
    out.warnings.append(quality.QualityWarning(
        "cines_left_out", "; ".join(m.partition(", ")[2] for m in left_out)))
  out.warnings += quality.record_warnings(record, cfg)
  out.record = record
  return out


def prepare_input(path: str, cfg: preprocess.PreprocessConfig, *, salt: str,
                  layout: str = layouts.GENERIC, labels: str = "",
                  limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> list[Prepared]:
  """The studies of one input, each preprocessed with `cfg` or with the reason it failed.

  Args:
    path: a study folder or zip, a folder of studies, one DICOM file, or a DICOMDIR (its
      folder is read).
    cfg: the model's preprocessing.
    salt: pseudonymisation salt.
    layout: how studies are found (`layouts.LAYOUTS`; "generic": by StudyInstanceUID).
    labels: optional reference labels CSV for the layout (reported as `lvef_reference`).
    limits: what one file may make the reader read and allocate (`files.ReadLimits`).

  Returns:
    One `Prepared` per study found, or a single one with the error when none is usable.
  """
  # A DICOMDIR indexes the files of its folder (CD/DVD exports): the folder is the input.
  root = (os.path.dirname(os.path.abspath(path)) if os.path.isfile(path)
          and os.path.basename(path).upper() == DICOMDIR else path)
  shown = dicom_files.printable(path)
  try:
    discovery = layouts.discover(layout, root, labels=labels, limits=limits)
  except Exception as e:  # pylint: disable=broad-except
    return [Prepared(shown, error=dicom_files.printable(f"input not readable ({_error_text(e)})"))]
  orphans = collections.Counter(reason for ref, reason in discovery.orphans
                                if not layouts.is_ukbb_manifest(ref))  # expected there
  if not discovery.specs:
    return [Prepared(shown, error="no DICOM study found (" + (_counts(orphans) or "no files")
                     + ")")]
  del orphans[parse.DICOMDIR_REASON]  # an index of the files: expected, not a problem
  common = []
  if orphans:
    common.append(quality.QualityWarning(
        "files_outside_studies",
        f"{_files(sum(orphans.values()))} below the input in no study ({_counts(orphans)})"))
  if len(discovery.specs) > 1:
    common.append(quality.QualityWarning(
        "several_studies", f"the input holds {len(discovery.specs)} studies (one row each; "
        "tools/predict.py --links=FILE lists the folder each came from)"))
  return [_prepare_spec(path, root, spec, cfg, salt, common, limits) for spec in discovery.specs]


def prepare_split(data_dir: str, split: str,
                  cfg: preprocess.PreprocessConfig) -> Iterator[Prepared]:
  """The records of an ingested dataset split with their quality warnings (checked geometry)."""
  records.check_preprocess(data_dir, cfg)
  source = records.open_split(data_dir, split)
  for i in range(len(source)):
    record = source[i]
    yield Prepared(f"{data_dir}:{split}", record.study_id, record,
                   quality.record_warnings(record, cfg))
