"""LVEF for new studies: DICOM folders or zips (or ingested records) -> one row per study.

`predict` reads every input, scores its studies with a fine-tuning run's best checkpoint and
returns the rows with a summary; nothing needs a training set. An input or study that cannot be
read gets a row with the reason and the others carry on. The modules:

- `inputs`: DICOM inputs (folders, zips, DICOMDIRs) read and preprocessed as ingestion does,
  or a dataset split's records: `Prepared` studies with their quality warnings
  (`cmr_jax.data.quality`) or the reason they could not be read;
- `scoring`: full and leave-one-cine-out bags, test-time augmentation
  (`inference.tta_predictions`), the interval (its formula and meaning are documented there)
  and one `Row` per study;
- `rows`: the typed row (LVEF, interval, flags, the bag's views and attention, warnings) and its
  JSON form;
- `output`: the summary, JSON and CSV files, the terminal table.

Privacy: rows and logs carry the input paths the user gave, pseudonyms (HMAC under the given
salt, or a random per-run salt) and scrubbed series names; never DICOM identifiers. Only when
asked (`links`, tools/predict.py --links) does it also name the folder below an input that holds
each study (folder names may name patients): in a file of its own, readable by its owner.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from absl import logging

from cmr_jax import files
from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax import inference
from cmr_jax.predict import inputs as inputs_lib
from cmr_jax.predict import output
from cmr_jax.predict import scoring

LOG_EVERY_S = 10.0


def _progress(groups: Iterable[list[inputs_lib.Prepared]], total: int,
              what: str) -> Iterator[inputs_lib.Prepared]:
  """The studies of each group (an input, a record) in turn, logging progress, rate and ETA."""
  start = last = time.monotonic()
  for done, group in enumerate(groups, 1):
    yield from group
    now = time.monotonic()
    if now - last >= LOG_EVERY_S or done == total:
      rate = done / max(now - start, 1e-9)
      logging.info("%d/%d %s processed (%.2f/s, ETA %.0f s)", done, total, what, rate,
                   (total - done) / rate)
      last = now


def _noting_links(prepared: Iterable[inputs_lib.Prepared],
                  links: list[dict[str, str]]) -> Iterator[inputs_lib.Prepared]:
  for item in prepared:
    if item.study and item.location:
      links.append({"study": item.study, "input": item.input, "location": item.location})
    yield item


def check_arguments(*, inputs: Sequence[str] = (), data_dir: str = "", split: str = "test",
                    labels: str = "", output_path: str = "", links_path: str = "") -> None:
  """What tools/predict.py refuses before loading a model or predicting anything.

  Raises:
    ValueError (one line): neither or both of inputs and data_dir, an input or labels CSV that
      does not exist, a data_dir that is not a dataset or lacks the split, an output or links
      path that cannot be written (`output.check_writable`), links with a data_dir.
  """
  if bool(inputs) == bool(data_dir):
    raise ValueError("give study folders/zips as arguments, or --data_dir (not both)")
  if output_path:
    output.check_writable(output_path)
  if links_path:
    if data_dir:
      raise ValueError("--links names the folders of DICOM inputs: not with --data_dir")
    if output_path and os.path.abspath(links_path) == os.path.abspath(output_path):
      raise ValueError(f"--links {links_path} is the --output file")
    output.check_writable(links_path, (".csv",), "--links")
  missing = [p for p in inputs if not os.path.lexists(p)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"input {dicom_files.printable(missing[0])} does not exist{more}")
  if labels and not os.path.isfile(labels):
    raise ValueError(f"--labels {dicom_files.printable(labels)} is not a file")
  if data_dir:
    if not files.isfile(files.join(data_dir, records.DATASET_INFO)):
      raise ValueError(f"--data_dir {data_dir} is not a dataset (no {records.DATASET_INFO}): "
                       "give the --output folder of tools/ingest.py")
    available = sorted(records.read_dataset_info(data_dir)["splits"])
    if split not in available:
      raise ValueError(f"--data_dir {data_dir} has no split {split!r}; it has "
                       f"{', '.join(available) or 'none'}")


def predict(predictor: inference.Predictor, *, inputs: Sequence[str] = (), data_dir: str = "",
            split: str = "test", salt: str = "", layout: str = layouts.GENERIC,
            labels: str = "", loo: bool = True, workdir: str = "", tta: int = 1,
            limits: dicom_files.ReadLimits = dicom_files.ReadLimits(),
            level: float = scoring.DEFAULT_LEVEL,
            links: list[dict[str, str]] | None = None) -> dict[str, Any]:
  """Predicts LVEF for DICOM inputs or for the records of a dataset split.

  Args:
    predictor: the fine-tuned model (`inference.Predictor(workdir)`).
    inputs: study folders, zips or DICOM files (one or more rows each).
    data_dir: instead of inputs, an ingested dataset (records with the model's preprocessing).
    split: the dataset split to score.
    salt: pseudonymisation salt for DICOM inputs (required with inputs).
    layout: how studies are found below each input.
    labels: optional reference labels CSV for the layout.
    loo: compute the leave-one-cine-out spread.
    workdir: the run's folder: its calibration.json, and the output's model section.
    tta: prediction passes averaged per bag (see `scoring.score`).
    level: the intervals' nominal coverage (see `scoring`).
    limits: what one DICOM file may claim or hold (`dicom_files.ReadLimits`).
    links: a list to extend with {"study", "input", "location"} per study of the DICOM inputs:
      the folder below its input that holds its files (`output.write_links`); not in the result.

  Returns:
    {"model": ..., "interval_method": ..., "warnings": [...], "studies": [rows], "summary": ...},
    the rows in their JSON form (`rows.Row.to_dict`).

  Raises:
    ValueError: for neither or both of inputs and data_dir, no salt with inputs, a dataset
      preprocessed differently from the model's training data, or a level the run's
      calibration lacks.
  """
  if bool(inputs) == bool(data_dir):
    raise ValueError("give study inputs or a data_dir, not both or neither")
  cfg = preprocess.PreprocessConfig.from_dict(predictor.preprocess)
  if data_dir:
    prepared = _progress(([p] for p in inputs_lib.prepare_split(data_dir, split, cfg)),
                         len(records.load_index(data_dir, split)), "records")
  else:
    if not salt:
      raise ValueError("a pseudonymisation salt is needed to read DICOM inputs")
    prepared = _progress((inputs_lib.prepare_input(p, cfg, salt=salt, layout=layout,
                                                   labels=labels, limits=limits)
                          for p in inputs),
                         len(inputs), "inputs")
  model = scoring.model_info(predictor, workdir, tta=tta, loo=loo, level=level)
  model_warnings = model.warnings()
  for w in model_warnings:
    logging.warning("%s", w.message)
  if links is not None:
    prepared = _noting_links(prepared, links)
  rows = scoring.score(predictor, prepared, loo=loo, tta=tta, model=model)
  return {
      "model": {"workdir": workdir, "best": model.best, "preprocess": model.preprocess,
                "max_instances": model.max_instances, "tta_passes": tta,
                "calibration": None if model.calibration is None else model.calibration.to_dict()},
      "interval_method": model.describe(),
      "warnings": [dataclasses.asdict(w) for w in model_warnings],
      "studies": [r.to_dict() for r in rows],
      "summary": output.summarize(rows),
  }
