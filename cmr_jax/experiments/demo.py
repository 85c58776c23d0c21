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
   `tools/predict.py` commands use.
Each stage is skipped when its output is already complete (re-running resumes).
"""

import json
import os
import time

from absl import logging
import ml_collections
import numpy as np

from cmr_jax.data import records
from cmr_jax.eval import metrics
from cmr_jax.experiments import stages
from cmr_jax import inference
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
  md = table(results)
  wall = time.time() - t0
  timing = (f"wall time {wall / 60:.1f} min (data {t_data:.0f} s, pre-training {t_pre:.0f} s, "
            "fine-tuning " + ", ".join(f"{k} {v:.0f} s" for k, v in t_arms.items()) + ")")
  out = {"results": results, "model": model, "wall_s": wall,
         "stage_s": {"data": t_data, "pretrain": t_pre, **t_arms}}
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
