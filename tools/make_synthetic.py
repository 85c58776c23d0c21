r"""Writes the synthetic cine-CMR dataset (ArrayRecord study records) with PNG previews.

  python tools/make_synthetic.py --config=configs/synthetic_data.py --out=runs/synthetic

Prints a per-split summary (studies, subjects, LVEF) and writes `{out}/previews/*.png` (ED and ES
frames of SAX, 2CH, 3CH and 4CH of the first studies).
"""

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from cmr_jax.data import preprocess
from cmr_jax.eval import preview
from cmr_jax import logs
from cmr_jax.phantom import synthetic

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic_data.py",
                                          "dataset config file")
_OUT = flags.DEFINE_string("out", "runs/synthetic", "output dataset directory")


def make(config, out: str) -> str:
  """Builds the dataset of `config` into `out`, writes previews, returns the summary table."""
  spec = synthetic.SyntheticSpec.from_dict(config.spec.to_dict())
  cfg = preprocess.PreprocessConfig.from_dict(config.preprocess.to_dict())
  summary = synthetic.build_synthetic(spec, out, cfg=cfg, num_shards=config.num_shards,
                                      num_workers=config.num_workers)
  logging.info("%d studies in %.1f s (%.2f studies/s)", summary.num_items, summary.elapsed_s,
               summary.items_per_s)
  preview_dir = os.path.join(out, "previews")
  os.makedirs(preview_dir, exist_ok=True)
  for item in synthetic.build_items(spec)[:config.num_previews]:
    study = item.load()
    path = os.path.join(preview_dir, f"{study.study_id}.png")
    preview.save_preview_png(study, path)
    logging.info("preview %s", path)
  return synthetic.summary_table(out)


def main() -> None:
  print(make(_CONFIG.value, _OUT.value))


if __name__ == "__main__":
  logs.run(main)
