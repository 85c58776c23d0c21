r"""The main job on the embedded synthetic default: data, pre-training, fine-tuning, evaluation.

  python -m cmr_jax.demo --workdir=runs/demo

1. renders the synthetic phantom dataset (configs/synthetic_data.py) into `{workdir}/data`;
2. pre-trains the tiny MViT against the reports (configs/synthetic_pretrain.py);
3. fine-tunes LVEF with the encoder frozen (configs/synthetic_finetune.py) from (a) the
   pre-trained encoder and (b) a random one, with the same budget;
4. prints MAE and AUC (LVEF<40%) on the test and external-site splits for (a), (b) and (c) the
   training-mean predictor, and writes them to `{workdir}/results.json` and `results.md`;
5. links `{workdir}/model` to whichever of (a) and (b) has the lower validation MAE: the model
   README's `tools/predict.py` commands use.
Each stage is skipped when its output is already complete (re-running resumes).
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from cmr_jax import logs
from cmr_jax import stages
from cmr_jax.data import records
from cmr_jax.data import synthetic
from cmr_jax.eval import metrics
from cmr_jax.train import finetune
from cmr_jax.train import pretrain

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything is written")
_DATA = config_flags.DEFINE_config_file("data_config", "configs/synthetic_data.py", "dataset")
_PRETRAIN = config_flags.DEFINE_config_file("pretrain_config", "configs/synthetic_pretrain.py",
                                            "pre-training")
_FINETUNE = config_flags.DEFINE_config_file("finetune_config", "configs/synthetic_finetune.py",
                                            "fine-tuning")
EVAL_SPLITS = ("test", "external")
MODEL_LINK = "model"


def evaluate(workdir: str, data_dir: str, train_mean: float) -> dict[str, dict[str, dict]]:
  """Metrics of each fine-tuned run and of the mean predictor on the evaluation splits."""
  results: dict[str, dict[str, dict]] = {}
  available = records.read_dataset_info(data_dir)["splits"]
  for split in (s for s in EVAL_SPLITS if s in available):
    for name in ("pretrained", "scratch"):
      p = finetune.predict_run(os.path.join(workdir, f"finetune_{name}"), data_dir, split)
      keep = ~np.isnan(p["lvef"])
      results.setdefault(name, {})[split] = metrics.summary(p["lvef"][keep], p["pred"][keep])
    results.setdefault("train_mean", {})[split] = metrics.summary(
        p["lvef"][keep], np.full(keep.sum(), train_mean))
  return results


def select_model(work: str) -> str:
  """Points `{work}/model` at the fine-tuned run with the lower validation MAE; returns its name.

  The choice uses the validation split only (never test or external), so the reported test
  figures of the chosen run stay unbiased; README's predict command uses this link.
  """
  runs = {name: finetune.read_best(os.path.join(work, f"finetune_{name}"))["val_mae"]
          for name in ("pretrained", "scratch")}
  best = f"finetune_{min(runs, key=runs.get)}"
  link = os.path.join(work, MODEL_LINK)
  if os.path.lexists(link):
    os.remove(link)
  os.symlink(best, link)
  logging.info("validation MAE %s: %s is the demo's model (%s)", runs, best, link)
  return best


def table(results: dict[str, dict[str, dict]]) -> str:
  """A Markdown table: one row per model, MAE and AUC per split."""
  labels = {"pretrained": "(a) contrastive pre-trained, frozen encoder",
            "scratch": "(b) same architecture from scratch, same budget",
            "train_mean": "(c) training-mean predictor"}
  splits = list(next(iter(results.values())))
  head = "| model | " + " | ".join(f"{s} MAE | {s} AUC<40%" for s in splits) + " |"
  rows = [head, "|---" * (1 + 2 * len(splits)) + "|"]
  for name, per_split in results.items():
    cells = " | ".join(f"{per_split[s]['mae']:.2f} | {per_split[s]['auc_lvef_below_40']:.3f}"
                       for s in splits)
    rows.append(f"| {labels[name]} | {cells} |")
  return "\n".join(rows)


def main(argv):
  del argv
  logs.setup()
  t0 = time.time()
  work = _WORKDIR.value
  stages.use_compilation_cache(work)
  data_dir = os.path.join(work, "data")
  stages.make_data(_DATA.value, data_dir)
  t_data = time.time() - t0

  pre = _PRETRAIN.value
  pre.data.dir = data_dir
  pretrain_dir = os.path.join(work, "pretrain")
  if not stages.finished(pretrain_dir, pre):
    pretrain.train_and_evaluate(pre, pretrain_dir)
  t_pre = time.time() - t0 - t_data

  for name, init in (("pretrained", f"pretrain:{pretrain_dir}"), ("scratch", "random")):
    ft = _FINETUNE.value.copy_and_resolve_references()
    ft.data.dir, ft.init = data_dir, init
    run_dir = os.path.join(work, f"finetune_{name}")
    if not stages.finished(run_dir, ft):
      finetune.train_and_evaluate(ft, run_dir)
  t_ft = time.time() - t0 - t_data - t_pre

  model = select_model(work)
  train_mean = finetune.label_mean(data_dir, "train", 1.0)
  results = evaluate(work, data_dir, train_mean)
  md = table(results)
  wall = time.time() - t0
  timing = (f"wall time {wall / 60:.1f} min (data {t_data:.0f} s, pre-training {t_pre:.0f} s, "
            f"fine-tuning x2 {t_ft:.0f} s)")
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump({"results": results, "wall_s": wall}, f, indent=1)
  with open(os.path.join(work, "results.md"), "w") as f:
    f.write(md + "\n\n" + timing + "\n")
  print(synthetic.summary_table(data_dir))
  print()
  print(md)
  print(f"model for tools/predict.py: {os.path.join(work, MODEL_LINK)} -> {model} "
        "(the lower validation MAE)")
  print(timing)


if __name__ == "__main__":
  app.run(main)
