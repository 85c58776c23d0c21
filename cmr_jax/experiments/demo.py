r"""The main job on the embedded synthetic default: data, pre-training, fine-tuning, evaluation.

  python tools/demo.py --workdir=runs/demo   # = make demo

1. renders the synthetic phantom dataset (configs/synthetic_data.py) into `{workdir}/data`: the
   train/val/test subjects, a held-out protocol family (`external`) and a disjoint pre-training
   archive (`archive`, `archive_val`);
2. pre-trains the video encoder against the archive's reports (configs/synthetic_pretrain.py);
   no subject it sees is fine-tuned on or scored;
3. fine-tunes LVEF on the train split, validated on val, in three arms with the same head
   (`stages.ARMS`): `pretrained` (the pre-trained encoder frozen, the paper's setting),
   `random_frozen` (a random encoder frozen, same budget) and `scratch_full` (the whole network
   trained from random initialisation, `--transfer_config`: a supervised baseline);
4. prints MAE and AUC (LVEF<40%) on the test and external-site splits for each arm and for the
   training-mean predictor (`train_mean`), and writes them to `{workdir}/results.json` and
   `results.md`;
5. links `{workdir}/model` to the arm with the lowest validation MAE: the model README's
   `tools/predict.py` commands use;
6. calibrates that model's prediction intervals on the `calib` split (split conformal, predicted
   as `tools/predict.py` predicts: `conformal.DEFAULT_TTA` passes and leave-one-cine-out bags)
   and reports their coverage and mean width on test and external (`intervals` in results.json).
Each stage is skipped when its output is already complete (re-running resumes).
"""

import json
import os
import time

from absl import logging
import ml_collections
import numpy as np

from cmr_jax.data import records
from cmr_jax.eval import conformal
from cmr_jax.eval import metrics
from cmr_jax.experiments import stages
from cmr_jax import inference
from cmr_jax import intervals
from cmr_jax.phantom import synthetic
from cmr_jax import runs
from cmr_jax.train import finetune
from cmr_jax.train import pretrain


EVAL_SPLITS = ("test", "external")
MODEL_LINK = "model"
DEMO_ARMS = ("pretrained", "random_frozen", "scratch_full")


def run_dir(workdir: str, arm: str) -> str:
  """The fine-tuning run directory of `arm`."""
  return os.path.join(workdir, f"finetune_{arm}")


def evaluate(workdir: str, data_dir: str, train_mean: float,
             arms=DEMO_ARMS) -> dict[str, dict[str, dict]]:
  """Metrics of each arm's best checkpoint and of the training-mean predictor per split.

  Each arm's checkpoint is restored once and reads each evaluation split once (the
  deterministic pass).
  """
  results: dict[str, dict[str, dict]] = {}
  reference: dict[str, dict] = {}
  available = records.read_dataset_info(data_dir)["splits"]
  splits = [s for s in EVAL_SPLITS if s in available]
  for name in arms:
    predictor = inference.Predictor(run_dir(workdir, name))
    for split in splits:
      p = predictor(records.open_split(data_dir, split))
      truth = p["lvef"][~np.isnan(p["lvef"])]
      results.setdefault(name, {})[split] = metrics.summary(truth, p["pred"][~np.isnan(p["lvef"])])
      if split not in reference:  # every arm reads the same labels
        reference[split] = metrics.summary(truth, np.full(truth.shape, train_mean))
  results[stages.TRAIN_MEAN] = reference  # the reference row last
  return results


def select_model(work: str, arms=DEMO_ARMS) -> str:
  """Points `{work}/model` at the arm with the lowest validation MAE; returns its run's name.

  The choice uses the validation split only (never test or external), so the reported test
  figures of the chosen run stay unbiased; README's predict command uses this link.
  """
  val = {name: runs.read_best(run_dir(work, name))["val_mae"] for name in arms}
  best = os.path.basename(run_dir(work, min(val, key=val.get)))
  link = os.path.join(work, MODEL_LINK)
  if os.path.lexists(link):
    os.remove(link)
  os.symlink(best, link)
  logging.info("validation MAE %s: %s is the demo's model (%s)", val, best, link)
  return best


def check_intervals(work: str, data_dir: str, model: str) -> dict | None:
  """Calibrates `model`'s intervals on the calib split (unless its calibration.json is for its
  checkpoint and predict's passes already) and measures them on the evaluation splits.

  Returns:
    {"calibration": ..., split: conformal.split_coverage(...)}, or None without a calib split.
  """
  available = records.read_dataset_info(data_dir)["splits"]
  if intervals.CALIB_SPLIT not in available:
    return None
  run = os.path.join(work, model)
  predictor = inference.Predictor(run)
  cal = intervals.read(run)
  if cal is None or not cal.belongs_to(predictor.best) or cal.tta != conformal.DEFAULT_TTA:
    cal = conformal.calibrate(predictor, run, data_dir)
  out: dict = {"calibration": cal.to_dict()}
  for split in (s for s in EVAL_SPLITS if s in available):
    out[split] = conformal.split_coverage(predictor, cal, records.open_split(data_dir, split))
  return out


def interval_table(checked: dict) -> str:
  """A Markdown table: coverage and mean width of each calibrated interval per split."""
  cal = checked["calibration"]
  splits = [s for s in checked if s != "calibration" and checked[s]]
  head = ("| interval | " + " | ".join(f"{s} coverage | {s} width (x MAE)" for s in splits)
          + " |")
  rows = [head, "|---" * (1 + 2 * len(splits)) + "|"]
  for method, levels in cal["quantiles"].items():
    for level in levels:
      cells = []
      for s in splits:
        c = checked[s]["methods"][method][level]
        ratio = c["mean_width"] / checked[s]["mae"]
        cells += [f"{c['coverage']:.3f}", f"{c['mean_width']:.1f} ({ratio:.1f})"]
      used = " (used)" if method == cal["method"] else ""
      rows.append(f"| {method}{used} {float(level):.0%} | " + " | ".join(cells) + " |")
  mae = ", ".join(f"{s} {checked[s]['mae']:.2f}" for s in splits)
  return (f"Prediction intervals of the model, split-conformal on {cal['n']} `{cal['split']}` "
          f"studies, predicted with {cal['tta']} passes and leave-one-cine-out bags (MAE of "
          f"those predictions: {mae}):\n\n" + "\n".join(rows))


def table(results: dict[str, dict[str, dict]]) -> str:
  """A Markdown table: one row per model, MAE and AUC per split."""
  labels = {name: arm.label for name, arm in stages.ARMS.items()}
  labels[stages.TRAIN_MEAN] = "training-mean predictor"
  splits = list(next(iter(results.values())))
  head = "| row | model | " + " | ".join(f"{s} MAE | {s} AUC<40%" for s in splits) + " |"
  rows = [head, "|---" * (2 + 2 * len(splits)) + "|"]
  for name, per_split in results.items():
    cells = " | ".join(f"{per_split[s]['mae']:.2f} | {per_split[s]['auc_lvef_below_40']:.3f}"
                       for s in splits)
    rows.append(f"| `{name}` | {labels[name]} | {cells} |")
  return "\n".join(rows)


def run(work: str, data_config: ml_collections.ConfigDict,
        pretrain_config: ml_collections.ConfigDict, frozen_config: ml_collections.ConfigDict,
        transfer_config: ml_collections.ConfigDict) -> dict:
  """Runs (or resumes) every stage in `work`; writes and returns the results.json content."""
  t0 = time.time()
  stages.use_compilation_cache(work)
  data_dir = os.path.join(work, "data")
  stages.make_data(data_config, data_dir)
  t_data = time.time() - t0

  pre = pretrain_config.copy_and_resolve_references()
  pre.data.dir = data_dir
  pretrain_dir = os.path.join(work, "pretrain")
  if not stages.finished(pretrain_dir, pre, upstream=[stages.data_stamp(data_dir)]):
    pretrain.train_and_evaluate(pre, pretrain_dir)
  t_pre = time.time() - t0 - t_data

  t_arms = {}
  for name in DEMO_ARMS:
    t_arm = time.time()
    ft = stages.arm_config(stages.ARMS[name], frozen_config, transfer_config, data_dir,
                           pretrain_dir)
    upstream = stages.upstream_of(name, data_dir, pretrain_dir, pre)
    if not stages.finished(run_dir(work, name), ft, upstream):
      finetune.train_and_evaluate(ft, run_dir(work, name))
    t_arms[name] = time.time() - t_arm

  model = select_model(work)
  train_mean = finetune.label_mean(data_dir, "train", 1.0)
  results = evaluate(work, data_dir, train_mean)
  t_iv = time.time()
  checked = check_intervals(work, data_dir, model)
  t_iv = time.time() - t_iv
  md = table(results)
  if checked:
    md += "\n\n" + interval_table(checked)
  wall = time.time() - t0
  timing = (f"wall time {wall / 60:.1f} min (data {t_data:.0f} s, pre-training {t_pre:.0f} s, "
            "fine-tuning " + ", ".join(f"{k} {v:.0f} s" for k, v in t_arms.items())
            + f", intervals {t_iv:.0f} s)")
  out = {"results": results, "model": model, "intervals": checked, "wall_s": wall,
         "stage_s": {"data": t_data, "pretrain": t_pre, **t_arms, "intervals": t_iv}}
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(work, "results.md"), "w") as f:
    f.write(md + "\n\n" + timing + "\n")
  print(synthetic.summary_table(data_dir))
  print()
  print(md)
  print(f"model for tools/predict.py: {os.path.join(work, MODEL_LINK)} -> {model} "
        "(the lowest validation MAE)")
  print(timing)
  return out
