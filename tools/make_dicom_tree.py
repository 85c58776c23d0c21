r"""Writes a large Kaggle-layout DICOM study tree of phantom studies, for timing ingestion.

  python tools/make_dicom_tree.py --out=/tmp/kaggle_tree --num_studies=40
  python tools/ingest.py --layout=kaggle --input=/tmp/kaggle_tree --output=/tmp/kaggle_records \
      --allow_default_salt --workers=2

Each study is a `kaggle_like` phantom scan (`cmr_jax.phantom.simulator`) with its own frame
count (uniform in [--min_frames, --max_frames]), SAX slice count ([--min_sax, --max_sax]) and
square matrix (one of --matrices), written by `cmr_jax.testing.dicom_writer.write_kaggle` as
`<out>/train/train/<Id>/study/{sax_N,2ch_N,4ch_N}/IM-ssss-ffff.dcm` (one file per frame) plus
`<out>/train.csv`. The defaults give the sizes of issue 15: 40 studies, ~286 files each, 20-30
frames, 7-12 SAX slices, up to 224x224. Deterministic in --seed. Keep the tree out of git.
"""

import dataclasses
import os
import shutil

from absl import flags
from absl import logging
import numpy as np

from cmr_jax import logs
from cmr_jax.data import types
from cmr_jax.phantom import scanner
from cmr_jax.phantom import simulator
from cmr_jax.testing import dicom_writer

_OUT = flags.DEFINE_string("out", None, "Output folder (the Kaggle root).", required=True)
_NUM_STUDIES = flags.DEFINE_integer("num_studies", 40, "Studies to write.")
_SEED = flags.DEFINE_integer("seed", 15, "Phantom dataset seed.")
_MIN_FRAMES = flags.DEFINE_integer("min_frames", 20, "Fewest frames per cine.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 30, "Most frames per cine.")
_MIN_SAX = flags.DEFINE_integer("min_sax", 7, "Fewest SAX slices.")
_MAX_SAX = flags.DEFINE_integer("max_sax", 12, "Most SAX slices.")
_MATRICES = flags.DEFINE_list("matrices", ["176", "192", "208", "224"], "Square matrix sizes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")

_SITE = "kaggle_like"
_FIRST_ID = 1


def study_shape(seed: int, index: int) -> tuple[int, int, int]:
  """(frames, SAX slices, matrix) of study `index`: deterministic draws within the flags."""
  rng = np.random.default_rng([seed, index, 1015])
  return (int(rng.integers(_MIN_FRAMES.value, _MAX_FRAMES.value + 1)),
          int(rng.integers(_MIN_SAX.value, _MAX_SAX.value + 1)),
          int(rng.choice([int(m) for m in _MATRICES.value])))


def make_study(seed: int, index: int) -> types.Study:
  """Phantom study `index` at its drawn size, SAX stack cut to the drawn slice count."""
  frames, num_sax, matrix = study_shape(seed, index)
  protocol = dataclasses.replace(
      scanner.fast_protocol(scanner.SITES[_SITE], frames, matrix), num_sax_slices=(num_sax, num_sax),
      lax_missing_prob=0.0)
  rng = np.random.default_rng([seed, index, 7])
  subject = f"tree-{seed}-{index:04d}"
  study = simulator.simulate_study(simulator.subject_heart(seed, index), protocol, rng,
                                   study_id=subject, subject_id=subject)
  sax = [c for c in study.cines if c.view == types.SAX][:num_sax]
  return dataclasses.replace(study, cines=sax + [c for c in study.cines if c.view != types.SAX])


def main() -> None:
  out = _OUT.value
  if os.path.exists(out):
    if not _OVERWRITE.value:
      raise SystemExit(f"{out} exists: pass --overwrite to replace it")
    shutil.rmtree(out)
  total_files = 0
  for index in range(_NUM_STUDIES.value):
    study = make_study(_SEED.value, index)
    # One study at a time keeps memory flat; write_kaggle rewrites train.csv, so collect labels.
    base = dicom_writer.write_kaggle([study], os.path.join(out, ".one"), ids=[_FIRST_ID + index],
                                     identities=[dicom_writer.fake_identity(index)])
    target = os.path.join(out, "train", "train", str(_FIRST_ID + index))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(base, str(_FIRST_ID + index)), target)
    with open(os.path.join(out, ".one", "train.csv")) as f:
      header, row = f.read().splitlines()[:2]
    labels = os.path.join(out, "train.csv")
    with open(labels, "a") as f:
      f.write((header + "\n" if index == 0 else "") + row + "\n")
    shutil.rmtree(os.path.join(out, ".one"))
    files = sum(len(names) for _, _, names in os.walk(target))
    total_files += files
    frames, num_sax, matrix = study_shape(_SEED.value, index)
    logging.info("study %d: %d files (%d frames, %d SAX, %dx%d)", index, files, frames,
                 len([c for c in study.cines if c.view == types.SAX]), matrix, matrix)
  print(f"{_NUM_STUDIES.value} studies, {total_files} files "
        f"({total_files / max(1, _NUM_STUDIES.value):.0f} per study) in {out}")


if __name__ == "__main__":
  logs.run(main)
