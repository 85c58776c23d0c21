r"""Calibrates a fine-tuned run's prediction intervals (split conformal) on held-out studies.

  python tools/calibrate.py --workdir=runs/demo/model --data_dir=runs/demo/data --split=calib

Predicts the split's labelled studies exactly as tools/predict.py does (--tta passes, the
leave-one-cine-out bags) with the run's best checkpoint and writes `{workdir}/calibration.json`:
the conformal quantiles of the 90% and 95% intervals (`cmr_jax.intervals`). tools/predict.py
then reports calibrated intervals; tools/evaluate.py their coverage on other splits. The split
must hold studies the checkpoint was neither trained nor chosen on (not train, not val): the
synthetic data and `tools/ingest.py --fractions=...,calib=...` give a `calib` split.
Fine-tuning (tools/train.py) calibrates by itself when its dataset has a `calib` split.
"""

from absl import app
from absl import flags

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.eval import conformal
from cmr_jax import inference
from cmr_jax import intervals
from cmr_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning run folder.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset (same preprocessing as the run).",
                                required=True)
_SPLIT = flags.DEFINE_string("split", intervals.CALIB_SPLIT,
                             "Held-out split to calibrate on (never train or val).")
_TTA = flags.DEFINE_integer("tta", conformal.DEFAULT_TTA,
                            "Prediction passes per bag: as tools/predict.py --tta.")
_LOO = flags.DEFINE_bool("loo", True, "Leave-one-cine-out spreads (study-dependent widths), as "
                         "tools/predict.py --loo.")
REFUSED_SPLITS = ("train", "val")  # the checkpoint was trained or chosen on them


def main() -> None:
  if _SPLIT.value in REFUSED_SPLITS:
    raise app.UsageError(f"--split {_SPLIT.value}: the checkpoint was trained or chosen on it; "
                         "calibrate on studies it has not seen (e.g. calib)")
  if _TTA.value < 1:
    raise app.UsageError(f"--tta must be at least 1, got {_TTA.value}")
  try:
    predictor = inference.Predictor(_WORKDIR.value)
    records.check_preprocess(_DATA_DIR.value, preprocess.PreprocessConfig.from_dict(
        predictor.preprocess))
    cal = conformal.calibrate(predictor, _WORKDIR.value, _DATA_DIR.value, _SPLIT.value,
                              tta=_TTA.value, loo=_LOO.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e).replace("\n", " ")) from None
  print(f"calibrated on {cal.n} {cal.split} studies (MAE {cal.mae:.2f}, tta={cal.tta}): "
        + "; ".join(f"{m} q{lv}={q:.3g}" for m, qs in cal.quantiles.items()
                    for lv, q in qs.items()))
  print(f"written to {_WORKDIR.value}/{intervals.CALIBRATION_JSON}")


if __name__ == "__main__":
  logs.run(main)
