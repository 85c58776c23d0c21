r"""The embedded synthetic dataset: phantom studies at two internal sites, an external site,
rescans, and a disjoint pre-training archive.

Make it (records, summary and PNG previews) with:

  python tools/make_synthetic.py --config=configs/synthetic_data.py --out=runs/synthetic

`--config=configs/synthetic_data.py:small` gives a quick variant (for smoke tests); any field can be
overridden, e.g. `--config.spec.num_subjects=1000 --config.preprocess.size=112`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Dataset spec, preprocessing and build settings; `arg`: None (default), "small", "benchmark"."""
  config = ml_collections.ConfigDict()
  config.spec = dict(
      seed=0,
      num_subjects=240,  # internal sites: train/val/test by subject
      sites=("ukbb_like", "kaggle_like"),
      num_external=48,  # the held-out protocol family: split "external"
      external_site="siteC",
      # The pre-training archive: subjects in no other split (splits "archive", "archive_val"),
      # scanned at the internal protocol families; contrastive pre-training reads only these.
      num_archive=400,
      archive_sites=(),
      # Calibration subjects (split "calib"): neither fine-tuned on nor used to choose a
      # checkpoint; the prediction intervals are calibrated on them (split conformal).
      num_calib=100,
      rescan_fraction=0.1,
      frames=16,  # rendered frames per cycle
      matrix=112,  # rendered matrix
  )
  # Stored form: 64 px at 2.75 mm (176 mm field of view about the heart), 16 frames per cycle.
  # orientation: each cine rotated in its plane to one anatomical layout (long-axis views apex
  # down, short-axis slices anterior up), as tools/ingest.py stores DICOM by default.
  config.preprocess = dict(size=64, spacing_mm=2.75, num_frames=16, orientation="anatomical")
  config.num_shards = 4
  config.num_workers = 2
  config.num_previews = 4
  if arg == "small":
    config.spec.num_subjects = 12
    config.spec.num_external = 4
    config.spec.num_archive = 20  # 2 of them in archive_val
    config.spec.num_calib = 10
    config.num_shards = 2
    config.num_previews = 1
  elif arg == "benchmark":  # the synthetic benchmark (python tools/benchmark.py)
    config.spec.num_subjects = 1000
    config.spec.num_external = 150
    config.spec.num_archive = 2000
    config.spec.num_calib = 300
    config.num_previews = 8
  elif arg not in (None, ""):
    raise ValueError(f"unknown synthetic_data config argument {arg!r}")
  return config
