r"""The synthetic benchmark: the paper's claims in shape, on the phantom.

  python tools/benchmark.py --workdir=runs/benchmark
  # a GPU (minutes) or a CPU (about an hour); smaller: --fractions=0.1,1 --arms=pretrained

1. the dataset (`--data_config`, default configs/synthetic_data.py:benchmark: 1000 subjects at two
   internal protocol families, 150 at a third held out as the `external` split, 10% rescans);
2. contrastive video-report pre-training (`--pretrain_config`, default
   configs/synthetic_pretrain.py:benchmark), keeping a checkpoint every `keep_period` steps for
   checkpoint sweeps (`tools/sweep.py`);
3. LVEF fine-tuning for every arm in `--arms` (`stages.ARMS`: "pretrained", the run of step 2
   frozen; "random_frozen", a random encoder frozen; "scratch_full", the whole network from
   random init, `--transfer_config`; "pretrained_transfer", the run of step 2 with every layer
   trained; or any `kinetics:PATH` / `cmr_transformer:PATH` / `pretrain:DIR[:STEP]` init with the
   encoder frozen, e.g. converted Kinetics-400 MViT weights) at every label fraction in
   `--fractions` (drawn by subject, nested);
4. every fine-tuned run scored on the test and external splits with subject-bootstrap 95%
   intervals, next to the training-mean predictor: `benchmark.json`, `benchmark.md` (one
   data-efficiency table per split and metric) and `data_efficiency.png` (names that do not
   clash with the demo's, so the benchmark can reuse a demo workdir's data and pre-training).
Every stage is skipped when its output is complete, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import numpy as np
import ml_collections

from cmr_jax.data import records
from cmr_jax.eval import metrics
from cmr_jax.eval import plots
from cmr_jax.eval import report
from cmr_jax.experiments import stages
from cmr_jax import inference
from cmr_jax.train import finetune
from cmr_jax.train import pretrain

METRICS = ("mae", "auc_lvef_below_40")
EVAL_SPLITS = ("test", "external")
MEAN_MODEL = stages.TRAIN_MEAN


def arm_config(name: str, frozen: ml_collections.ConfigDict,
               transfer: ml_collections.ConfigDict, data_dir: str, pretrain_dir: str):
  """The fine-tuning config of an arm name, or of an init string with the encoder frozen."""
  if name in stages.ARMS:
    return stages.arm_config(stages.ARMS[name], frozen, transfer, data_dir, pretrain_dir)
  config = frozen.copy_and_resolve_references()
  config.data.dir, config.init = data_dir, name
  return config


def needs_pretraining(names: list[str]) -> bool:
  """Whether any arm starts from this benchmark's pre-training run."""
  return any(stages.ARMS[n].pretrained for n in names if n in stages.ARMS)


def run_name(init: str, fraction: float) -> str:
  """A file-system-safe run directory name for (init, fraction)."""
  safe = "".join(c if c.isalnum() else "_" for c in init)[:60]
  return f"finetune_{safe}_{fraction:g}"


def score(truth: np.ndarray, pred: np.ndarray, subjects: list[str], n_boot: int) -> dict:
  """Point metrics with subject-bootstrap intervals."""
  return metrics.with_ci(truth, pred, subjects, n_boot=n_boot)


def tables(results: dict, splits: list[str]) -> str:
  """One Markdown data-efficiency table per split and metric (model x label fraction)."""
  sections = []
  for split in splits:
    for metric in METRICS:
      table = report.data_efficiency_table(
          {m: {f: r[split] for f, r in per.items()} for m, per in results.items()}, metric)
      sections.append(f"### {split}: {metric}\n\n{table}")
  return "\n\n".join(sections)


def plot(results: dict, splits: list[str], path: str) -> None:
  """MAE against label fraction, one line per init, one panel per split."""
  plots.data_efficiency(results, splits, path, title="LVEF fine-tuning arms (MIL head)")


def run(work: str, data_config: ml_collections.ConfigDict,
        pretrain_config: ml_collections.ConfigDict, frozen_config: ml_collections.ConfigDict,
        transfer_config: ml_collections.ConfigDict, *, fractions: list[float], arms: list[str],
        bootstrap: int = 1000) -> dict:
  """Runs (or resumes) every stage in `work`; writes and returns the benchmark.json content."""
  t0 = time.time()
  stages.use_compilation_cache(work)
  if not fractions or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f"label fractions must lie in (0, 1], got {fractions}")
  data_dir = os.path.join(work, "data")
  stages.make_data(data_config, data_dir)

  pre = pretrain_config.copy_and_resolve_references()
  pre.data.dir = data_dir
  pretrain_dir = os.path.join(work, "pretrain")
  if needs_pretraining(arms) and not stages.finished(
      pretrain_dir, pre, upstream=[stages.data_stamp(data_dir)]):
    pretrain.train_and_evaluate(pre, pretrain_dir)

  available = records.read_dataset_info(data_dir)["splits"]
  splits = [s for s in EVAL_SPLITS if s in available]
  meta = {s: records.load_index(data_dir, s) for s in splits}
  results: dict[str, dict[float, dict[str, dict]]] = {}
  skipped: list[str] = []
  for name in arms:
    for fraction in fractions:
      ft = arm_config(name, frozen_config, transfer_config, data_dir, pretrain_dir)
      ft.data.label_fraction = fraction
      run_dir = os.path.join(work, run_name(name, fraction))
      try:
        mean = finetune.label_mean(data_dir, ft.data.train_split, fraction)
      except ValueError as e:  # e.g. 1% of a small training split: no subject drawn
        logging.warning("skipped %s at label fraction %g: %s", name, fraction, e)
        skipped.append(f"{name} at label fraction {fraction:g}: {e}")
        continue
      upstream = stages.upstream_of(name, data_dir, pretrain_dir, pre)
      if not stages.finished(run_dir, ft, upstream):
        logging.info("fine-tuning %s at label fraction %g", name, fraction)
        finetune.train_and_evaluate(ft, run_dir)
      predictor = inference.Predictor(run_dir)
      for split in splits:
        p = predictor(records.open_split(data_dir, split))
        keep = ~np.isnan(p["lvef"])
        subjects = [meta[split][i]["subject_id"] for i in p["study_index"][keep]]
        truth = p["lvef"][keep]
        results.setdefault(name, {}).setdefault(fraction, {})[split] = score(
            truth, p["pred"][keep], subjects, bootstrap)
        results.setdefault(MEAN_MODEL, {}).setdefault(fraction, {})[split] = score(
            truth, np.full(truth.shape, mean), subjects, bootstrap)

  if not results:
    raise ValueError(f"nothing to report: every run was skipped ({'; '.join(skipped)})")
  results[MEAN_MODEL] = results.pop(MEAN_MODEL)  # the reference column last
  wall = time.time() - t0
  md = tables(results, splits) + "".join(f"\n\nskipped: {s}" for s in skipped)
  md += f"\n\nwall time {wall / 60:.1f} min\n"
  out = {"results": {m: {str(k): v for k, v in per.items()} for m, per in results.items()},
         "skipped": skipped, "wall_s": wall}
  with open(os.path.join(work, "benchmark.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(work, "benchmark.md"), "w") as f:
    f.write(md)
  plot(results, splits, os.path.join(work, "data_efficiency.png"))
  print(md)
  return out
