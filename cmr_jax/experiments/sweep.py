"""Checkpoint sweep: downstream LVEF accuracy of every kept pre-training checkpoint.

For each checkpoint a pre-training run keeps (`{pretrain_dir}/checkpoints/{step}`: the last few
and every `keep_period`-th step), a short fine-tune (`cmr_jax.train.finetune`) starts from its
encoder in `{out}/step_{step}/`, and its best checkpoint is scored on the validation and test
splits (MAE and MSE over the labelled studies). A checkpoint is done when
`{out}/step_{step}/sweep_result.json` exists: a re-run skips done checkpoints and resumes a
fine-tune that was cut short from its own checkpoints. Hosts split the checkpoints round-robin
(`assign`); `merge` builds the table (CSV, Markdown, JSON), a plot of MAE against pre-training
step and loss, and the Spearman correlations from every result file present.

The pre-training loss of a checkpoint is the training loss logged at its step in the run's
`metrics.jsonl` (or the last one logged before it): one batch's InfoNCE value, not a smoothed
one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from matplotlib import figure
from matplotlib.backends import backend_agg
import ml_collections
import numpy as np
from scipy import stats

from cmr_jax.data import records
from cmr_jax.eval import metrics
from cmr_jax import inference
from cmr_jax import runs
from cmr_jax.train import finetune

RESULT_JSON = "sweep_result.json"
SETTINGS_JSON = "sweep_settings.json"
STEP_DIR_PREFIX = "step_"
TABLE_CSV = "sweep.csv"
TABLE_MD = "sweep.md"
SUMMARY_JSON = "sweep.json"
PLOT_PNG = "sweep.png"
COLUMNS = ("step", "pretrain_loss", "pretrain_loss_step", "val_mae", "val_mse", "test_mae",
           "test_mse", "n_val", "n_test", "finetune_best_step", "finetune_s")
# Spearman correlations reported: downstream metric against a pre-training quantity.
CORRELATED = (("val_mae", "step"), ("val_mae", "pretrain_loss"), ("test_mae", "step"),
              ("test_mae", "pretrain_loss"))
# Resamples of the Spearman permutation test (all pairings when there are fewer).
PERMUTATIONS = 9999
# Launcher variables giving (rank, world size) of independent processes, in order of preference.
RANK_ENVIRONMENT = (("SLURM_PROCID", "SLURM_NTASKS"),
                    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                    ("PMI_RANK", "PMI_SIZE"))


class SweepError(RuntimeError):
  """Some checkpoints could not be fine-tuned or scored (the others are done and merged)."""


def step_dir(out_dir: str, step: int) -> str:
  """The fine-tuning run directory of pre-training step `step`."""
  return os.path.join(out_dir, f"{STEP_DIR_PREFIX}{step}")


def assign(steps: Sequence[int], num_shards: int, shard_index: int) -> list[int]:
  """The checkpoints of shard `shard_index` of `num_shards`: round-robin over sorted steps."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard index {shard_index} not in [0, {num_shards})")
  return sorted(steps)[shard_index::num_shards]


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
  """(shard_index, num_shards) from a multi-process launcher (SLURM, Open MPI, MPICH); (0, 1).

  Each process of such a job runs its own fine-tunes on its own devices: the processes are not
  joined with `jax.distributed` (a joined job would run every fine-tune across all of them).
  """
  for rank, size in RANK_ENVIRONMENT:
    if rank in environ and size in environ:
      return int(environ[rank]), int(environ[size])
  return 0, 1


def pretrain_losses(pretrain_dir: str) -> dict[int, float]:
  """Training loss per logged step of a pre-training run (a re-run step keeps its last value)."""
  path = os.path.join(pretrain_dir, runs.METRICS_JSONL)
  out: dict[int, float] = {}
  if not os.path.exists(path):
    logging.warning("%s not found: the sweep has no pre-training losses", path)
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[int(row["step"])] = float(row["loss"])
  return out


def loss_at(losses: Mapping[int, float], step: int) -> tuple[float, int | None]:
  """(loss, the step it was logged at): at `step`, else the last logged before; (NaN, None)."""
  logged = [s for s in losses if s <= step]
  if not logged:
    return math.nan, None
  at = max(logged)
  return losses[at], at


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _labelled_count(data_dir: str, split: str) -> int:
  info = records.read_dataset_info(data_dir)
  if split not in info["splits"]:
    raise KeyError(f"split {split!r} not in {data_dir}; it has {sorted(info['splits'])}")
  return sum(m["lvef"] is not None for m in records.load_index(data_dir, split))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings as {"a.b.c": leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _check_settings(out_dir: str, settings: dict[str, Any]) -> None:
  """Records the sweep's settings in `out_dir`, or checks that they equal those recorded."""
  path = os.path.join(out_dir, SETTINGS_JSON)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    if recorded != settings:
      old, new = _flat(recorded), _flat(settings)
      diff = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                       for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
      raise ValueError(f"{out_dir} holds a sweep with other settings ({diff}; see {path}): "
                       "resume it with the same settings or use another output folder")
    return
  os.makedirs(out_dir, exist_ok=True)
  _write_atomic(path, json.dumps(settings, indent=1))


def checkpoint_stamp(pretrain_dir: str, step: int) -> int:
  """Modification time (ns) of a pre-training checkpoint: changes if the step is written anew."""
  return os.stat(os.path.join(pretrain_dir, runs.CHECKPOINT_DIR, str(step))).st_mtime_ns


def stale_steps(out_dir: str, pretrain_dir: str) -> list[int]:
  """Done steps whose pre-training checkpoint was rewritten after their fine-tune started."""
  kept = set(runs.checkpoint_steps(pretrain_dir))
  return [r["step"] for r in read_results(out_dir) if r["step"] in kept
          and r.get("checkpoint_stamp") not in (None, checkpoint_stamp(pretrain_dir, r["step"]))]


def _split_errors(data_dir: str, split: str, predictor: inference.Predictor) -> dict[str, float]:
  p = predictor(records.open_split(data_dir, split))
  labelled = ~np.isnan(p["lvef"])
  truth, pred = p["lvef"][labelled], p["pred"][labelled]
  return {"mae": metrics.mae(truth, pred), "mse": float(np.mean((pred - truth) ** 2)),
          "n": int(labelled.sum())}


def finetune_one(pretrain_dir: str, step: int, config: ml_collections.ConfigDict, out_dir: str,
                 test_split: str, loss: tuple[float, int | None]) -> dict[str, Any]:
  """Fine-tunes from checkpoint `step`, scores its best checkpoint, writes the result file."""
  workdir = step_dir(out_dir, step)
  config = ml_collections.ConfigDict(config.to_dict())
  config.init = f"pretrain:{os.path.abspath(pretrain_dir)}:{step}"
  stamp = checkpoint_stamp(pretrain_dir, step)
  t0 = time.time()
  finetune.train_and_evaluate(config, workdir)
  predictor = inference.Predictor(workdir)
  d = config.data
  val = _split_errors(d.dir, d.eval_split, predictor)
  test = _split_errors(d.dir, test_split, predictor)
  result = {"step": step, "pretrain_loss": loss[0], "pretrain_loss_step": loss[1],
            "val_mae": val["mae"], "val_mse": val["mse"], "test_mae": test["mae"],
            "test_mse": test["mse"], "n_val": val["n"], "n_test": test["n"],
            "finetune_best_step": predictor.best["step"] if predictor.best else None,
            "finetune_s": time.time() - t0, "checkpoint_stamp": stamp}
  _write_atomic(os.path.join(workdir, RESULT_JSON), json.dumps(result, indent=1))
  return result


def run_sweep(pretrain_dir: str, finetune_config: ml_collections.ConfigDict, out_dir: str, *,
              label_fraction: float | None = None, test_split: str = "test",
              num_shards: int = 1, shard_index: int = 0) -> dict[str, Any]:
  """Fine-tunes and scores this shard's checkpoints that are not done, then merges.

  Args:
    pretrain_dir: the pre-training run directory.
    finetune_config: the fine-tuning config (its `init` is set per checkpoint).
    out_dir: the sweep directory: one fine-tuning run per checkpoint, the table and the plot.
    label_fraction: fraction of labelled training subjects (None: the config's).
    test_split: the split scored besides `config.data.eval_split` (validation).
    num_shards: how many processes share the sweep.
    shard_index: this process's share.

  Returns:
    The merged summary (see `merge`).

  Raises:
    FileNotFoundError: for a pre-training directory without checkpoints or a missing dataset.
    ValueError: for splits without LVEF labels, or an output folder of a different sweep.
    SweepError: when some checkpoints failed (each named with its reason); the rest are merged.
  """
  config = ml_collections.ConfigDict(finetune_config.to_dict())
  if label_fraction is not None:
    config.data.label_fraction = label_fraction
  steps = runs.checkpoint_steps(pretrain_dir)
  d = config.data
  for split in (d.train_split, d.eval_split, test_split):
    if not _labelled_count(d.dir, split):
      raise ValueError(f"split {split!r} of {d.dir} has no study with an LVEF label: the sweep "
                       "fine-tunes and scores on labelled studies")
  settings = {"pretrain_dir": os.path.abspath(pretrain_dir), "test_split": test_split,
              "finetune_config": {k: v for k, v in _config_dict(config).items() if k != "init"}}
  _check_settings(out_dir, settings)
  stale = stale_steps(out_dir, pretrain_dir)
  if stale:
    raise ValueError(f"the pre-training checkpoints of steps {stale} in {pretrain_dir} were "
                     f"written anew after this sweep fine-tuned them (a new run in the same "
                     f"folder?): their results in {out_dir} are stale; use another output folder")
  mine = assign(steps, num_shards, shard_index)
  todo = [s for s in mine if not os.path.exists(os.path.join(step_dir(out_dir, s), RESULT_JSON))]
  logging.info("sweep of %s: %d kept checkpoints %s; shard %d of %d has %d, %d already done, "
               "%d to fine-tune", pretrain_dir, len(steps), steps, shard_index, num_shards,
               len(mine), len(mine) - len(todo), len(todo))
  losses = pretrain_losses(pretrain_dir)
  failed: dict[int, str] = {}
  t0 = time.time()
  for i, step in enumerate(todo):
    try:
      r = finetune_one(pretrain_dir, step, config, out_dir, test_split, loss_at(losses, step))
    except Exception as e:  # pylint: disable=broad-except
      failed[step] = f"{type(e).__name__}: {e}"
      logging.error("checkpoint %d failed, skipped: %s\n%s", step, failed[step],
                    traceback.format_exc())
      continue
    elapsed = time.time() - t0
    rate = (i + 1) / elapsed
    logging.info("checkpoint %d (%d/%d of this shard): val MAE %.3f, test MAE %.3f in %.0f s | "
                 "%.2f checkpoints/h, ETA %.1f min", step, i + 1, len(todo), r["val_mae"],
                 r["test_mae"], r["finetune_s"], rate * 3600, (len(todo) - i - 1) / rate / 60)
  summary = merge(out_dir)
  if failed:
    raise SweepError(f"{len(failed)} of {len(todo)} checkpoints failed (re-running the sweep "
                     "retries them): "
                     + "; ".join(f"step {s}: {why}" for s, why in sorted(failed.items())))
  return summary


def read_results(out_dir: str) -> list[dict[str, Any]]:
  """The result rows present in a sweep directory, by pre-training step."""
  rows = []
  for name in os.listdir(out_dir):
    path = os.path.join(out_dir, name, RESULT_JSON)
    if re.fullmatch(rf"{STEP_DIR_PREFIX}\d+", name) and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows.append(json.load(f))
  return sorted(rows, key=lambda r: r["step"])


def spearman(rows: Sequence[Mapping[str, Any]], y: str, x: str) -> dict[str, Any]:
  """Spearman rank correlation of column `y` against `x` over rows where both are finite.

  rho is scipy's; its two-sided p-value comes from a permutation test (exact over all
  pairings up to 7 rows, else PERMUTATIONS seeded resamples): sweeps have few checkpoints,
  where the t approximation is far off (it gives p = 0 for any perfect ranking).
  """
  pairs = [(r[x], r[y]) for r in rows if r[x] is not None and r[y] is not None
           and math.isfinite(r[x]) and math.isfinite(r[y])]
  if len(pairs) < 2 or min(len(set(column)) for column in zip(*pairs)) < 2:
    return {"rho": math.nan, "p": math.nan, "n": len(pairs)}  # undefined: too few, or constant
  xs, ys = np.array(pairs, np.float64).T  # [n] each
  x_ranks = stats.rankdata(xs)

  def rho_of(y_values: np.ndarray, axis: int) -> np.ndarray:
    y_ranks = stats.rankdata(y_values, axis=axis)
    return stats.pearsonr(np.broadcast_to(x_ranks, y_ranks.shape), y_ranks, axis=axis).statistic

  test = stats.permutation_test((ys,), rho_of, permutation_type="pairings", vectorized=True,
                                n_resamples=PERMUTATIONS, rng=np.random.default_rng(0))
  return {"rho": float(stats.spearmanr(xs, ys).statistic), "p": float(test.pvalue),
          "n": len(pairs)}


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.6g}"
  return str(v)


def markdown(summary: Mapping[str, Any]) -> str:
  """The sweep table and its correlations as Markdown."""
  lines = [f"Checkpoint sweep of `{summary['pretrain_dir']}` ({len(summary['rows'])} of "
           f"{len(summary['kept_steps'])} kept checkpoints done).", "",
           "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in summary["rows"]]
  lines += ["", "| Spearman | rho | p | n |", "|---|---|---|---|"]
  lines += [f"| {name.replace('_vs_', ' vs ')} | {_fmt(c['rho'])} | {_fmt(c['p'])} | {c['n']} |"
            for name, c in summary["spearman"].items()]
  if summary["missing_steps"]:
    lines += ["", f"Not done yet: steps {summary['missing_steps']}."]
  if summary["stale_steps"]:
    lines += ["", f"Stale (checkpoint written anew after its fine-tune): steps "
              f"{summary['stale_steps']}."]
  return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str) -> None:
  """MAE (val and test) against pre-training step and loss, Spearman rho in the legends."""
  rows = summary["rows"]
  fig = figure.Figure(figsize=(10, 4), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  for ax, x, label in ((axes[0], "step", "pre-training step"),
                       (axes[1], "pretrain_loss", "pre-training loss")):
    for y, marker in (("val_mae", "o"), ("test_mae", "s")):
      pts = sorted((r[x], r[y]) for r in rows if r[x] is not None and math.isfinite(r[x]))
      if pts:
        ax.plot(*zip(*pts), marker=marker, linestyle="-" if x == "step" else "",
                label=f"{y.split('_')[0]} (rho {summary['spearman'][f'{y}_vs_{x}']['rho']:.2f})")
    ax.set_xlabel(label)
    ax.set_ylabel("downstream LVEF MAE (%)")
    ax.set_title(f"MAE vs {label}")
    ax.grid(alpha=0.3)
    ax.legend()
  tmp = f"{path}.tmp{os.getpid()}"
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, path)


def merge(out_dir: str) -> dict[str, Any]:
  """Builds the table, correlations and plot from every result file in `out_dir`.

  Writes sweep.csv, sweep.md, sweep.json and sweep.png there; returns the summary:
  {"pretrain_dir", "kept_steps", "missing_steps", "stale_steps" (see `stale_steps`),
   "rows": [per checkpoint, COLUMNS],
   "spearman": {"<y>_vs_<x>": {"rho", "p", "n"}}}.
  """
  path = os.path.join(out_dir, SETTINGS_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {out_dir} is not a sweep directory")
  with open(path, encoding="utf-8") as f:
    settings = json.load(f)
  rows = read_results(out_dir)
  kept = runs.checkpoint_steps(settings["pretrain_dir"])
  done = {r["step"] for r in rows}
  stale = stale_steps(out_dir, settings["pretrain_dir"])
  if stale:
    logging.warning("the pre-training checkpoints of steps %s were written anew after their "
                    "fine-tunes: their rows are stale", stale)
  summary = {"pretrain_dir": settings["pretrain_dir"], "kept_steps": kept, "stale_steps": stale,
             "missing_steps": [s for s in kept if s not in done],
             "rows": [{c: r.get(c) for c in COLUMNS} for r in rows],
             "spearman": {f"{y}_vs_{x}": spearman(rows, y, x) for y, x in CORRELATED}}
  _write_atomic(os.path.join(out_dir, SUMMARY_JSON), json.dumps(summary, indent=1))
  _write_atomic(os.path.join(out_dir, TABLE_MD), markdown(summary))
  tmp = os.path.join(out_dir, f"{TABLE_CSV}.tmp{os.getpid()}")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(summary["rows"])
  os.replace(tmp, os.path.join(out_dir, TABLE_CSV))
  if rows:
    plot(summary, os.path.join(out_dir, PLOT_PNG))
  logging.info("sweep table of %d checkpoints in %s%s", len(rows), out_dir,
               f"; not done yet: steps {summary['missing_steps']}"
               if summary["missing_steps"] else "")
  return summary
