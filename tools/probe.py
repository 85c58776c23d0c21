r"""Linear probe of frozen video encoders: ridge regression of LVEF on bag-pooled features.

  python tools/probe.py --data_dir=runs/benchmark/data --out=runs/benchmark/probe \
      --init=pretrained=pretrain:runs/benchmark/pretrain --init=scratch=random
  python tools/probe.py --data_dir=runs/demo/data --out=runs/demo/probe \
      --init=pretrain:runs/demo/pretrain --init=random --fractions=0.1,1

Each `--init` (NAME=INIT or INIT; INIT as fine-tuning's `config.init`: random,
pretrain:WORKDIR[:STEP], kinetics:PATH, cmr_transformer:PATH) is encoded once over the training and
evaluation splits (the fine-tuning bag, eval crop); a standardised ridge regression is fitted per
label fraction (alpha by subject-grouped 5-fold cross-validation) and scored with subject-bootstrap
95% intervals (cmr_jax/eval/probe.py). Writes `probe.json`, `probe.md` and `probe.png` (MAE against
label fraction) to --out and prints the table. The encoder geometry, crop and bag size come from
--finetune_config, which must match the encoder's pre-training.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cmr_jax.data import records
from cmr_jax.eval import plots
from cmr_jax.eval import probe
from cmr_jax import logs

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Ingested dataset.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_INIT = flags.DEFINE_multi_string("init", ["random"], "Encoders: NAME=INIT or INIT (repeatable).")
_CONFIG = config_flags.DEFINE_config_file("finetune_config", "configs/synthetic_finetune.py",
                                          "Fine-tuning config: encoder geometry, crop, bag size.")
_TRAIN = flags.DEFINE_string("train_split", "train", "Split the probes are fitted on.")
_SPLITS = flags.DEFINE_list("splits", ["test", "external"],
                            "Evaluation splits (those missing from the dataset are left out).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.1", "1"], "Label fractions of the training "
                               "split, drawn by subject.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Subject-bootstrap replicates.")


def main() -> None:
  try:
    inits = probe.parse_inits(_INIT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  fractions = [float(f) for f in _FRACTIONS.value]
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise app.UsageError(f"--fractions must lie in (0, 1], got {_FRACTIONS.value}")
  available = records.read_dataset_info(_DATA_DIR.value)["splits"]
  if _TRAIN.value not in available:
    raise app.UsageError(f"--train_split {_TRAIN.value!r} is not in {_DATA_DIR.value} "
                         f"(it has {sorted(available)})")
  eval_splits = [s for s in _SPLITS.value if s in available]
  if not eval_splits:
    raise app.UsageError(f"none of --splits {_SPLITS.value} is in {_DATA_DIR.value} "
                         f"(it has {sorted(available)})")
  config = _CONFIG.value
  config.data.dir = _DATA_DIR.value
  by_init = {}
  for name, init in inits.items():
    logging.info("probing %s (%s)", name, init)
    pooled = probe.encode_splits(init, _DATA_DIR.value, config, [_TRAIN.value, *eval_splits])
    by_init[name] = {"init": init, **probe.evaluate(
        pooled, train_split=_TRAIN.value, eval_splits=eval_splits, fractions=fractions,
        n_boot=_BOOTSTRAP.value)}
  os.makedirs(_OUT.value, exist_ok=True)
  md = probe.table(by_init, eval_splits)
  md += "".join(f"\n\nskipped: {name}, {s}" for name, r in by_init.items() for s in r["skipped"])
  with open(os.path.join(_OUT.value, "probe.json"), "w", encoding="utf-8") as f:
    json.dump({"data_dir": _DATA_DIR.value, "train_split": _TRAIN.value, "by_init": by_init}, f,
              indent=1)
  with open(os.path.join(_OUT.value, "probe.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  curves = {name: {float(k): v for k, v in r["results"].items()} for name, r in by_init.items()
            if r["results"]}
  if curves:
    plots.data_efficiency(curves, eval_splits, os.path.join(_OUT.value, "probe.png"),
                          title="linear probe (ridge) on frozen encoder features")
  print(md)
  logging.info("written to %s", _OUT.value)


if __name__ == "__main__":
  logs.run(main)
