"""The studies of a split with the largest absolute error: the report's "Largest errors" section.

Studies are ranked by |predicted - reference LVEF| among the split's labelled studies, largest
first (ties keep the predictions CSV's order). Each of the N first gets an entry built from its
predictions-CSV row (pseudonymous study id, subject, every bag instance's view and attention)
and from its record, found by its study index (no model call):

- quality warnings: `cmr_jax.data.quality.record_warnings` (no long-axis or short-axis view, few
  SAX slices, coarse acquired pixels). The acquisition warnings of `quality.source_warnings` (few
  frames per cycle, no trigger times, unknown heart rate) need the DICOM: records do not keep it.
- a thumbnail strip `{out}/worst/{split}_{rank:02d}_{study_id}.png`: the end-diastolic (top) and
  end-systolic (bottom) frame of every cine in the bag, ED and ES read from the images as the
  dataset previews do (`cmr_jax.eval.preview.ed_es_frames`: the largest and smallest summed
  intensity of the moving region of the SAX cines, the bright blood pool).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import preprocess
from cmr_jax.data import quality
from cmr_jax.data import types
from cmr_jax.eval import plots
from cmr_jax.eval import preview

THUMBNAIL_DIR = "worst"
DEFAULT_COUNT = 8
UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def ranking(truth: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
  """Positions of the (at most) n largest |pred - truth|, largest first; NaN truth is skipped.

  Args:
    truth: [N] reference LVEF (NaN if unlabelled).
    pred: [N] predicted LVEF.
    n: how many.

  Returns:
    int [min(n, labelled)] positions into truth/pred.
  """
  error = np.abs(np.asarray(pred, np.float64) - np.asarray(truth, np.float64))  # [N]
  labelled = np.flatnonzero(~np.isnan(error))
  return labelled[np.argsort(-error[labelled], kind="stable")][:n]


def as_study(record: types.StudyRecord) -> types.Study:
  """A record's stored cines as a `types.Study` (for the helpers written for studies)."""
  spacing = (float(record.spacing_mm), float(record.spacing_mm))
  cines = [types.Cine(frames=frames, pixel_spacing=spacing, view=view, slice_index=int(index))
           for frames, view, index in zip(record.frames, record.views, record.slice_index)]
  return types.Study(record.study_id, record.subject_id, record.site, cines)


def bag_phases(record: types.StudyRecord, max_instances: int) -> tuple[np.ndarray, int, int]:
  """(frames uint8 [K, 2, S, S]: the ED then the ES frame of each bag cine, ED index, ES index)."""
  bag = pipeline.bag_indices(record.views, record.slice_index, max_instances)
  ed, es = preview.ed_es_frames(as_study(record))
  return record.frames[bag][:, [ed, es]], ed, es


def row_instances(row: dict[str, str], max_instances: int) -> list[tuple[str, float]]:
  """(view label, attention) of each bag instance of a predictions-CSV row, in bag order."""
  return [(row[f"instance_{k}_view"], float(row[f"instance_{k}_attention"]))
          for k in range(1, max_instances + 1) if row.get(f"instance_{k}_view")]


def thumbnail_path(split: str, rank: int, study_id: str) -> str:
  """The strip's path relative to the report folder."""
  name = UNSAFE_FILENAME_CHARS.sub("_", f"{split}_{rank:02d}_{study_id}")
  return os.path.join(THUMBNAIL_DIR, f"{name}.png")


def entries(p: dict[str, np.ndarray], rows: Sequence[dict[str, str]], source: pipeline.Source,
            cfg: preprocess.PreprocessConfig, *, split: str, n: int, max_instances: int,
            out: str, write: bool) -> list[dict[str, Any]]:
  """The n studies of a split with the largest |error|; writes their strips when `write`.

  Args:
    p: the split's predictions (`evaluate.tta_predictions`): study_index, lvef, pred [N].
    rows: its predictions-CSV rows, in the same order.
    source: the split's records (what p["study_index"] indexes).
    cfg: the preprocessing of the records (for the resolution warning).
    split: the split's name (in the strips' names).
    n: how many studies.
    max_instances: the model's bag size K.
    out: the report folder (strips go to `{out}/worst/`).
    write: whether to write the strips (the writing process only).

  Returns:
    One entry per study, largest error first: rank, study_id, subject, lvef_reference,
    lvef_predicted, abs_error, instances [{"view", "attention"}], warnings [{"code",
    "message"}], ed_frame, es_frame, thumbnail (relative to out). Empty without labels.
  """
  out_entries = []
  for rank, j in enumerate(ranking(p["lvef"], p["pred"], n), start=1):
    row, record = rows[j], source[int(p["study_index"][j])]
    instances = row_instances(row, max_instances)
    frames, ed, es = bag_phases(record, max_instances)  # frames [K, 2, S, S]
    if record.study_id != row["study_id"] or len(instances) != len(frames):
      raise RuntimeError(f"prediction row of {row['study_id']} does not match record "
                         f"{record.study_id} ({len(instances)} vs {len(frames)} instances)")
    truth, pred = float(p["lvef"][j]), float(p["pred"][j])
    thumbnail = thumbnail_path(split, rank, row["study_id"])
    if write:
      os.makedirs(os.path.join(out, THUMBNAIL_DIR), exist_ok=True)
      plots.bag_strip(frames, [f"{view}\nattention {a:.3f}" for view, a in instances],
                      (f"ED (frame {ed})", f"ES (frame {es})"), os.path.join(out, thumbnail),
                      f"{rank}. {row['study_id']}: reference {truth:.1f}%, predicted {pred:.1f}%")
    out_entries.append({
        "rank": rank, "study_id": row["study_id"], "subject": row["subject"],
        "lvef_reference": truth, "lvef_predicted": pred, "abs_error": abs(pred - truth),
        "instances": [{"view": view, "attention": a} for view, a in instances],
        "warnings": [{"code": w.code, "message": w.message}
                     for w in quality.record_warnings(record, cfg)],
        "ed_frame": ed, "es_frame": es, "thumbnail": thumbnail})
  return out_entries
