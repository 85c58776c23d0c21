r"""Evaluates a fine-tuned checkpoint on dataset splits: predictions CSV, metrics JSON with
subject-bootstrap 95% intervals, PNG plots and a Markdown report.

  python tools/evaluate.py --workdir=runs/demo/finetune_pretrained --data_dir=runs/demo/data \
      --split=test,external --out=runs/demo/eval_pretrained --tta=4

Writes `{out}/report.md`, `{out}/metrics.json` and per split `{out}/{split}/predictions.csv`
and the plots. A split without LVEF labels is predicted only (the report says so). The report's
"Largest errors" section lists the `--worst` studies of largest absolute error per split, with
thumbnail strips in `{out}/worst/`. See `cmr_jax.eval.evaluate` for test-time augmentation, the
cross-fitted bias correction and repeatability. A run calibrated by tools/calibrate.py also gets the
empirical coverage and mean width of its 90% and 95% prediction intervals on each split.
"""


from absl import app
from absl import flags

from cmr_jax.eval import evaluate
from cmr_jax.eval import report
from cmr_jax import logs
from cmr_jax import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "Fine-tuning run folder.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset (same preprocessing as the run).",
                                required=True)
_SPLIT = flags.DEFINE_list("split", ["test"], "Split(s) to evaluate, comma-separated.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_WHICH = flags.DEFINE_enum("which", "best", runs.CHECKPOINT_KINDS,
                           "The best validation checkpoint, or the latest of 'checkpoints'.")
_TTA = flags.DEFINE_integer("tta", 1, "Prediction passes per study (1: deterministic only; more: "
                            "augmented clip samplings, averaged).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", evaluate.Options.n_boot,
                                  "Subject-bootstrap replicates for the 95% intervals.")
_FOLDS = flags.DEFINE_integer("folds", evaluate.Options.folds,
                              "Folds (over subjects) of the bias-correction cross-fitting.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap and the folds.")
_WORST = flags.DEFINE_integer("worst", evaluate.Options.worst,
                              "Studies of largest absolute error listed per split, with their "
                              "bag, attention, warnings and ED/ES thumbnails (0: none).")
_INTERVALS = flags.DEFINE_bool("intervals", True, "With a calibrated run (calibration.json, "
                               "tools/calibrate.py): coverage and mean width of its prediction "
                               "intervals per split, predicted as tools/predict.py predicts.")


def main() -> None:
  try:
    options = evaluate.Options(tta=_TTA.value, n_boot=_BOOTSTRAP.value, seed=_SEED.value,
                               folds=_FOLDS.value, worst=_WORST.value,
                               intervals=_INTERVALS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  result = evaluate.evaluate(_WORKDIR.value, _DATA_DIR.value, _SPLIT.value, _OUT.value,
                             which=_WHICH.value, options=options)
  for split, s in result["splits"].items():
    print(report.headline(split, s))
    if s.get("intervals"):
      print(report.interval_headline(split, s["intervals"]))
  print(f"report: {_OUT.value}/{evaluate.REPORT_MD}")


if __name__ == "__main__":
  logs.run(main)
