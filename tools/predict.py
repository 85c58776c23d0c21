r"""Predicts LVEF for cine CMR studies with a fine-tuned checkpoint.

  python tools/predict.py --model=runs/finetune --output=lvef.csv /data/study1 /data/study2.zip

Each positional input is a study folder, a zip, a folder holding several studies (one row per
StudyInstanceUID) or one DICOM file, in any vendor layout. The output (.csv or .json, by the
name) has per study: the input path as given, LVEF in percent, an interval, the LVEF < 40% flag,
the views the model used with their attention weights, and quality warnings; an input that
cannot be read gets a row with the reason. The exit status is non-zero only when no study could
be predicted. Scoring an ingested dataset instead:

  python tools/predict.py --model=runs/finetune --data_dir=runs/records --split=test \
      --output=test.json

Studies are pseudonymised with --salt (or $CMR_JAX_SALT), else a random salt per run: the rows
are keyed by the input paths, so no salt needs keeping. See `cmr_jax.predict.scoring` for the
interval (split-conformal when the run has a calibration.json: tools/calibrate.py) and
`cmr_jax.data.quality` for the warnings. Files over the read limits (--max_file_bytes etc., as
in tools/ingest.py) are skipped with the reason.
"""

import os
import secrets

from absl import app
from absl import flags
from absl import logging

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import pseudonym
from cmr_jax.eval import conformal
from cmr_jax import inference
from cmr_jax import logs
from cmr_jax import predict
from cmr_jax.predict import output
from cmr_jax.predict import scoring

RANDOM_SALT_BYTES = 16
_MODEL = flags.DEFINE_string("model", None, "Fine-tuning run folder (its best checkpoint).",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output file: .csv or .json.", required=True)
_LINKS = flags.DEFINE_string(
    "links", "", "Also write this .csv: per study, its pseudonym, input and the folder below the "
    "input that holds its files, to match rows to studies where one input holds several. Folder "
    "names may name patients: a re-identification key, readable by you only; keep it apart "
    "from the results.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Score an ingested dataset instead of inputs.")
_SPLIT = flags.DEFINE_string("split", "test", "The --data_dir split to score.")
_LAYOUT = flags.DEFINE_enum("layout", layouts.GENERIC, layouts.LAYOUTS,
                            "How studies are found below each input (generic: by "
                            "StudyInstanceUID, any folder structure).")
_LABELS = flags.DEFINE_string("labels", "", "Optional reference labels CSV for --layout (as in "
                              "tools/ingest.py): reported next to the predictions.")
_SALT = flags.DEFINE_string(
    "salt", "", f"Pseudonymisation salt (default: ${pseudonym.SALT_ENV_VAR}, else random).")
_TTA = flags.DEFINE_integer(
    "tta", conformal.DEFAULT_TTA,
    "Prediction passes averaged per study: the deterministic pass and N-1 seeded "
    "augmented clip samplings (measured on the demo's test split: MAE 11.62 with 1, 10.40 with "
    "4; tools/evaluate.py --tta).")
_LOO = flags.DEFINE_bool("loo", True, "Leave-one-cine-out spread for the interval (costs one "
                         "forward pass per cine of the bag).")
_LEVEL = flags.DEFINE_float("level", scoring.DEFAULT_LEVEL, "Nominal coverage of the intervals: "
                            "one the run is calibrated at (calibration.json: 0.9, 0.95).")
# The same read limits, names and defaults as tools/ingest.py (`dicom_files.ReadLimits`).
_LIMITS = dicom_files.ReadLimits()
_LIMIT_FLAGS = [flags.DEFINE_integer(name, getattr(_LIMITS, name), help) for name, help in (
    ("max_file_bytes", "Bytes read from one file or zip member at most; larger files are "
     "skipped (with the reason in the row's warnings)."),
    ("max_frame_pixels", "Rows x Columns a file's header may claim."),
    ("max_frames_per_file", "NumberOfFrames a header may claim."),
    ("max_pixel_bytes", "Decoded pixel bytes a header may claim."),
    ("max_element_reads", "Reads of data elements (1-3 each: tag, length, value) while parsing "
     "one file."))]


def main(inputs: list[str]) -> int:
  try:  # before loading the model or predicting anything
    limits = dicom_files.ReadLimits(**{f.name: f.value for f in _LIMIT_FLAGS})
    if not 0.0 < _LEVEL.value < 1.0:
      raise ValueError(f"--level must be in (0, 1), got {_LEVEL.value}")
    predict.check_arguments(inputs=inputs, data_dir=_DATA_DIR.value, split=_SPLIT.value,
                            labels=_LABELS.value, output_path=_OUTPUT.value,
                            links_path=_LINKS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  salt = _SALT.value or os.environ.get(pseudonym.SALT_ENV_VAR, "")
  if salt:
    try:
      salt = pseudonym.resolve_salt(salt)
    except pseudonym.SaltError as e:
      raise app.UsageError(str(e)) from None
  elif inputs:
    salt = secrets.token_hex(RANDOM_SALT_BYTES)
    logging.info("no salt given: study pseudonyms use a random salt for this run")
  if not os.path.isdir(_MODEL.value):
    raise app.UsageError(f"--model {_MODEL.value} is not a folder (a fine-tuning run's)")
  try:
    predictor = inference.Predictor(_MODEL.value)
    if _DATA_DIR.value:
      records.check_preprocess(_DATA_DIR.value, preprocess.PreprocessConfig.from_dict(
          predictor.preprocess))
  # Not a fine-tuning run, a checkpoint that does not fit its config, a dataset preprocessed
  # otherwise than the model's training data: one line each.
    scoring.model_info(predictor, _MODEL.value, tta=_TTA.value, loo=_LOO.value,
                       level=_LEVEL.value)  # a level the run's calibration lacks
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--model {_MODEL.value}: {e}".replace("\n", " ")) from None
  if predictor.best:
    logging.info("model %s: step %d, validation MAE %.2f, RMSE %.2f (%d studies)", _MODEL.value,
                 predictor.best["step"], predictor.best["val_mae"], predictor.best["val_rmse"],
                 predictor.best["val_n"])
  links: list[dict[str, str]] | None = [] if _LINKS.value else None
  result = predict.predict(predictor, inputs=inputs, data_dir=_DATA_DIR.value,
                           split=_SPLIT.value, salt=salt, layout=_LAYOUT.value,
                           labels=_LABELS.value, loo=_LOO.value, workdir=_MODEL.value,
                           tta=_TTA.value, limits=limits, level=_LEVEL.value,
                           links=links)
  output.write(result, _OUTPUT.value)
  if _LINKS.value:
    output.write_links(links, _LINKS.value)
  summary = result["summary"]
  print(output.table(result["studies"]))
  print(f"{summary['predicted']} of {summary['rows']} studies predicted, {summary['failed']} "
        f"failed; written to {_OUTPUT.value}")
  if _LINKS.value:
    print(f"the folder of each of {len(links)} studies written to {_LINKS.value} (a "
          "re-identification key: keep it apart from the results)")
  if "mae" in summary:
    print(f"against {summary['labelled']} reference labels: MAE {summary['mae']:.2f}, RMSE "
          f"{summary['rmse']:.2f}, bias {summary['bias']:+.2f}")
  return 0 if summary["predicted"] else 1


if __name__ == "__main__":
  logs.run(main, positional=True)
