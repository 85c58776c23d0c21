r"""Converts a DICOM archive (Kaggle, UK Biobank or any PACS export) into study records.

  python tools/ingest.py --layout=generic --input=/data/export --output=/data/records \
      --salt="$SECRET" --labels=labels.csv --reports=reports.csv --workers=8

Writes records (ArrayRecord shards read by `cmr_jax.data.records.open_split`), dataset_info.json
and manifest.csv (every input file: used, or skipped with the reason) under --output; reruns
resume. Identifiers never reach the outputs or logs: studies, subjects and files are keyed
HMAC-SHA256 pseudonyms under --salt (or $CMR_JAX_SALT). Predicting on one study: point
--layout=generic --input at its folder or zip. To score the records with a trained model
(tools/predict.py --data_dir), store them as its training data was: --like_model=RUN (e.g.
runs/demo/model). See `cmr_jax.dicom.ingest` for the details.
"""

import dataclasses
import json

from absl import app
from absl import flags
from absl import logging

from cmr_jax.data import preprocess
from cmr_jax.data import splits
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import loading
from cmr_jax.dicom import pseudonym
from cmr_jax import files
from cmr_jax import logs

# `ingest` and `output` (ArrayRecord, flax, grain: ~3 s) are imported in main(): worker
# processes, started with `spawn`, import this file's top-level modules again.

_DEFAULTS = preprocess.PreprocessConfig()
_LIMITS = dicom_files.ReadLimits()
_LAYOUT = flags.DEFINE_enum("layout", None, layouts.LAYOUTS, "Archive layout.", required=True)
_INPUT = flags.DEFINE_string("input", None, "Input folder (or zip/file: generic).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output dataset folder.", required=True)
_SALT = flags.DEFINE_string(
    "salt", "", f"Secret pseudonymisation salt (default: ${pseudonym.SALT_ENV_VAR}).")
_ALLOW_DEFAULT_SALT = flags.DEFINE_bool(
    "allow_default_salt", False, "Use a public salt: synthetic demo data only.")
_LABELS = flags.DEFINE_string(
    "labels", "", "Labels CSV (Kaggle: comma-separated train/validate/solution CSVs, default "
    "found next to the data; UK Biobank: participant CSV with eid, 22420-2.0...; generic: "
    "study|study_uid|accession, lvef[, edv, esv]).")
_REPORTS = flags.DEFINE_string("reports", "", "Generic: reports CSV (accession|study_uid, report).")
_SITE = flags.DEFINE_string("site", "", "Site name stored in the records (default: the layout).")
_EXTERNAL = flags.DEFINE_bool("external", False, "Put every study in the split 'external'.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: this process).")
_CHUNK = flags.DEFINE_integer("chunk_studies", loading.DEFAULT_CHUNK_STUDIES,
                              "Studies per part (the unit of resumption).")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Shards per split within a part.")
_SIZE = flags.DEFINE_integer("size", _DEFAULTS.size, "Stored square side in pixels.")
_SPACING = flags.DEFINE_float("spacing_mm", _DEFAULTS.spacing_mm, "Stored mm per pixel.")
_FRAMES = flags.DEFINE_integer("frames", _DEFAULTS.num_frames, "Stored frames per cycle.")
_ORIENTATION = flags.DEFINE_enum(
    "orientation", _DEFAULTS.orientation, preprocess.ORIENTATIONS,
    "Stored in-plane layout: anatomical (long-axis views apex down, short-axis slices anterior "
    "up, from the DICOM plane geometry) or scanner (rows and columns as acquired).")
_LIKE_MODEL = flags.DEFINE_string(
    "like_model", "",
    "A fine-tuned run folder (e.g. runs/demo/model): store the records exactly as that model's "
    "training data (its preprocess.json), so that tools/predict.py --data_dir can apply it. "
    "--size/--spacing_mm/--frames/--orientation may not then say otherwise.")
_PATH_KEY = flags.DEFINE_string(
    "path_key", "", "Optional private CSV (outside --output) mapping file pseudonyms to paths.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild instead of resuming.")
_MAX_FILE_BYTES = flags.DEFINE_integer(
    "max_file_bytes", _LIMITS.max_file_bytes, "Bytes read from one file or zip member at most; "
    "larger files are skipped (manifest reason).")
_MAX_FRAME_PIXELS = flags.DEFINE_integer(
    "max_frame_pixels", _LIMITS.max_frame_pixels, "Rows x Columns a file's header may claim.")
_MAX_FRAMES = flags.DEFINE_integer(
    "max_frames_per_file", _LIMITS.max_frames_per_file, "NumberOfFrames a header may claim.")
_MAX_PIXEL_BYTES = flags.DEFINE_integer(
    "max_pixel_bytes", _LIMITS.max_pixel_bytes, "Decoded pixel bytes a header may claim.")
_MAX_ELEMENT_READS = flags.DEFINE_integer(
    "max_element_reads", _LIMITS.max_element_reads, "Reads of data elements (1-3 each: tag, "
    "length, value) while parsing one file.")
_ENGINE = flags.DEFINE_enum(
    "engine", "local", ["local", "beam"],
    "local: worker processes on this machine (resumable); beam: an Apache Beam pipeline "
    "(pip install -e '.[beam]'), runner and its options from --beam_args.")
_FRACTIONS = flags.DEFINE_string(
    "fractions", ",".join(f"{n}={f:g}" for n, f in splits.DEFAULT_FRACTIONS),
    "Splits by subject hash, name=fraction pairs summing to 1; add e.g. calib=0.1 for studies "
    "that calibrate a fine-tuned model's prediction intervals (tools/calibrate.py).")
_BEAM_ARGS = flags.DEFINE_string(
    "beam_args", "", "Beam pipeline options, space-separated (e.g. '--runner=DataflowRunner "
    "--project=... --region=... --temp_location=gs://...'); default: the direct runner.")


def parse_fractions(text: str) -> tuple[tuple[str, float], ...]:
  """"train=0.7,val=0.1,test=0.2" -> (("train", 0.7), ...), checked as a split rule.

  Raises:
    ValueError: a pair that is not name=number, or fractions a splitter refuses.
  """
  pairs = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    name, sep, value = item.partition("=")
    try:
      pairs.append((name.strip(), float(value)))
    except ValueError:
      sep = ""
    if not sep or not name.strip():
      raise ValueError(f"--fractions: {item!r} is not name=fraction")
  fractions = tuple(pairs)
  splits.SubjectSplitter(fractions=fractions)  # sums to 1, names unique and not reserved
  return fractions


def stored_form() -> preprocess.PreprocessConfig:
  """The records' preprocessing: --like_model's, or the defaults with the flags' values.

  Raises:
    ValueError: --like_model is not a run folder with a preprocess.json, or an explicit flag
      disagrees with it.
  """
  flag_values = {"size": _SIZE, "spacing_mm": _SPACING, "num_frames": _FRAMES,
                 "orientation": _ORIENTATION}
  if not _LIKE_MODEL.value:
    return dataclasses.replace(_DEFAULTS, **{k: f.value for k, f in flag_values.items()})
  from cmr_jax import runs  # pylint: disable=import-outside-toplevel  (jax: not in workers)
  path = files.join(_LIKE_MODEL.value, runs.PREPROCESS_JSON)  # a local path or a gs:// URL
  try:
    if not files.exists(path):
      raise FileNotFoundError(path)
    cfg = preprocess.PreprocessConfig.from_dict(runs.read_preprocess(_LIKE_MODEL.value))
  except FileNotFoundError:
    raise ValueError(f"--like_model: {path} does not exist (give a fine-tuned run folder, "
                     "e.g. runs/demo/model)") from None
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"--like_model: {path} cannot be read as a preprocessing config: "
                     f"{e}") from None
  for key, flag in flag_values.items():
    if flag.present and flag.value != getattr(cfg, key):
      raise ValueError(f"--{flag.name}={flag.value} disagrees with --like_model "
                       f"({key} {getattr(cfg, key)} in {path}): drop one of them")
  return cfg


def main() -> None:
  # pylint: disable=import-outside-toplevel
  from cmr_jax.dicom import ingest
  from cmr_jax.dicom import output as output_dir
  try:
    salt = pseudonym.resolve_salt(_SALT.value, allow_default=_ALLOW_DEFAULT_SALT.value)
  except pseudonym.SaltError as e:
    raise app.UsageError(str(e)) from None
  if salt == pseudonym.DEMO_SALT:
    logging.warning("using the public demo salt: pseudonyms are NOT protected (demo data only)")
  try:
    cfg = stored_form()
    limits = dicom_files.ReadLimits(
        max_file_bytes=_MAX_FILE_BYTES.value, max_frame_pixels=_MAX_FRAME_PIXELS.value,
        max_frames_per_file=_MAX_FRAMES.value, max_pixel_bytes=_MAX_PIXEL_BYTES.value,
        max_element_reads=_MAX_ELEMENT_READS.value)
    fractions = parse_fractions(_FRACTIONS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  options = ingest.IngestOptions(
      layout=_LAYOUT.value, input=_INPUT.value, output=_OUTPUT.value, salt=salt,
      labels=_LABELS.value, reports=_REPORTS.value, site=_SITE.value, external=_EXTERNAL.value,
      workers=_WORKERS.value, chunk_studies=_CHUNK.value, num_shards=_SHARDS.value,
      preprocess=cfg, path_key=_PATH_KEY.value, overwrite=_OVERWRITE.value, limits=limits,
      fractions=fractions)
  try:  # inputs and output are checked before anything in the output is removed or written
    if _ENGINE.value == "beam":
      from cmr_jax.dicom import beam_pipeline
      output_dir.check_input(options.layout, options.input, labels=options.labels,
                             reports=options.reports, path_key=options.path_key,
                             output=options.output)
      output_dir.prepare_rebuild(options.output, overwrite=options.overwrite)
      summary = beam_pipeline.run_beam_ingest(options, _BEAM_ARGS.value.split())
    else:
      summary = ingest.run_ingest(options)
  except output_dir.UsageProblem as e:
    raise app.UsageError(str(e)) from None
  print(f"files: {summary.files_in} in = {summary.files_used} used + {summary.files_skipped} "
        f"skipped; studies: {summary.num_studies} found, {summary.converted} converted now, "
        f"{summary.resumed} resumed, {summary.changed} converted again (files changed), "
        f"{summary.skipped_studies} without a record; {summary.studies_per_s:.2f} studies/s, "
        f"{summary.studies_per_s_per_core:.2f} studies/s/core ({summary.cores} cores)")
  print(json.dumps(dataclasses.asdict(summary), allow_nan=True))


if __name__ == "__main__":
  logs.run(main)
