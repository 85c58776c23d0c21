"""The per-study function of ingestion: one study's DICOM files -> a pseudonymised `Study`.

`load_study` reads the study's files, assembles its cines, pseudonymises, and accounts for every
file; `StudyLoader` is its picklable form, run in `records.build_dataset`'s worker processes
(`cmr_jax.dicom.ingest`) or mapped over studies by a distributed runner (`beam_pipeline`). This
module imports no more than that work needs (no ArrayRecord, flax or grain), so that a worker
process starts in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from collections.abc import Sequence

from absl import logging

from cmr_jax.data import preprocess
from cmr_jax.data import types
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax.dicom import pseudonym

DEFAULT_CHUNK_STUDIES = 500  # studies per part of an ingest run (the unit of resumption)


@dataclasses.dataclass(frozen=True)
class FileRow:
  """One manifest row: what became of one input file."""

  file: str  # pseudonym of the path relative to the input
  study: str  # study pseudonym ("" for files outside every study)
  series: str
  status: str  # assemble.USED or assemble.SKIPPED
  reason: str
  cine: str = ""  # the cine (preprocess.cine_name) a used file went into; not written out


@dataclasses.dataclass
class LoadedStudy:
  """The result of the per-study function: the study (None if unusable) and its file rows."""

  study: types.Study | None
  rows: list[FileRow]
  reason: str = ""  # why `study` is None
  notes: list[str] = dataclasses.field(default_factory=list)  # guesses made (`AssembledStudy`)
  conflicts: list[str] = dataclasses.field(default_factory=list)  # names overruled by geometry


def study_pseudonyms(spec: layouts.StudySpec, salt: str) -> tuple[str, str]:
  """(study_id, subject_id) of a spec: keyed hashes of its layout's identifiers."""
  return (pseudonym.pseudonym(salt, pseudonym.STUDY, f"{spec.layout}:{spec.key}"),
          pseudonym.pseudonym(salt, pseudonym.SUBJECT, f"{spec.layout}:{spec.subject_key}"))


def file_pseudonym(ref: dicom_files.FileRef, root: str, salt: str) -> str:
  """Pseudonym of an input file: keyed hash of its path relative to the input."""
  return pseudonym.pseudonym(salt, pseudonym.FILE, ref.relative(root))


def load_study(spec: layouts.StudySpec, *, salt: str, root: str,
               min_frames: int = assemble.MIN_CINE_FRAMES,
               limits: dicom_files.ReadLimits = dicom_files.ReadLimits()) -> LoadedStudy:
  """Reads one study's DICOM files into a pseudonymised `Study`; never raises.

  Args:
    spec: the study's files and layout facts (raw identifiers, memory only).
    salt: pseudonymisation salt.
    root: the input root (file pseudonyms are of paths relative to it).
    min_frames: the fewest frames a cine may have.
    limits: what one file may make the reader read and allocate.

  Returns:
    The study (None when no cine is usable, with the reason) and one row per file.
  """
  study_id, subject_id = study_pseudonyms(spec, salt)
  try:
    assembled = assemble.assemble_study(parse.read_files(spec.files, spec.hints, limits),
                                        min_frames=min_frames)
  except Exception as e:  # a bug or unforeseen input must cost one study, not the run  # pylint: disable=broad-except
    reason = f"study unreadable ({type(e).__name__})"
    # The traceback's code lines, not the message: messages may quote identifying values.
    logging.error("study %s: %s at\n%s", study_id, reason,
                  "".join(traceback.format_tb(e.__traceback__)))
    return LoadedStudy(None, [FileRow(file_pseudonym(r, root, salt), study_id, "",
                                      assemble.SKIPPED, reason) for r in spec.files], reason)
  identifiers = assembled.identifiers + (spec.key, spec.subject_key, assembled.study_uid)
  scrub = pseudonym.make_scrubber(identifiers)
  cines = [dataclasses.replace(c, series_description=scrub(c.series_description))
           for c in assembled.cines]
  rows = []
  for ref in spec.files:
    status, reason, series = assembled.file_status[ref]
    cine = assembled.file_cine.get(ref)
    rows.append(FileRow(file_pseudonym(ref, root, salt), study_id, scrub(series), status, reason,
                        cine=preprocess.cine_name(cines[cine]) if cine is not None else ""))
  if not cines:
    counts = assembled.skipped_reasons.most_common(3)
    reason = "no usable cine (" + "; ".join(f"{n} files: {r}" for r, n in counts) + ")"
    return LoadedStudy(None, rows, reason)
  study = types.Study(
      study_id=study_id, subject_id=subject_id, site=spec.site, cines=cines, lvef=spec.lvef,
      edv=spec.edv, esv=spec.esv, report=scrub(spec.report), visit=spec.visit,
      heart_rate_bpm=assembled.heart_rate_bpm)
  for note in assembled.notes:
    logging.info("study %s: %s", study_id, note)
  for conflict in assembled.conflicts:
    logging.warning("study %s: %s", study_id, conflict)
  return LoadedStudy(study, rows, notes=list(assembled.notes),
                     conflicts=list(assembled.conflicts))


def _write_rows(path: str, rows: Sequence[FileRow]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump([dataclasses.asdict(r) for r in rows], f)
  os.replace(tmp, path)


def _read_rows(path: str) -> list[FileRow]:
  with open(path) as f:
    return [FileRow(**r) for r in json.load(f)]


@dataclasses.dataclass(frozen=True)
class StudyLoader:
  """A picklable zero-argument loader for `records.build_dataset`: `load_study` + its rows.

  The file rows are written to `rows_path` (the worker's way to report them); an unusable
  study raises ValueError with the reason, which the build records as a skipped item.
  """

  spec: layouts.StudySpec
  salt: str
  root: str
  rows_path: str
  min_frames: int = assemble.MIN_CINE_FRAMES
  limits: dicom_files.ReadLimits = dicom_files.ReadLimits()

  def __call__(self) -> types.Study:
    loaded = load_study(self.spec, salt=self.salt, root=self.root, min_frames=self.min_frames,
                        limits=self.limits)
    _write_rows(self.rows_path, loaded.rows)
    if loaded.study is None:
      raise ValueError(loaded.reason)
    return loaded.study
