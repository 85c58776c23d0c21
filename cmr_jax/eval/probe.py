"""Linear probe of a frozen video encoder: ridge regression of LVEF on study-pooled features.

The read-out used for self-supervised encoders, free of the MIL head's optimisation noise: every
cine of a study's fine-tuning bag (4CH, 2CH, 3CH and the SAX subset; `pipeline.bag_indices`) goes
through the frozen encoder with the deterministic eval crop, the features are averaged over the bag,
standardised, and ridge-regressed on LVEF. The ridge penalty is chosen by cross-validation on the
training split grouped by subject (folds never split a subject's rescans), and the fitted probe is
scored on the evaluation splits with subject-bootstrap 95% intervals. Features are computed once
per encoder, so probes at every label fraction (drawn by subject, nested, as fine-tuning draws them)
cost almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

from flax import linen as nn
import jax
import ml_collections
import numpy as np
from sklearn import linear_model
from sklearn import model_selection
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import splits as splits_lib
from cmr_jax.eval import metrics
from cmr_jax import inference
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax import sharding

ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
MAX_FOLDS = 5


@dataclasses.dataclass
class PooledSplit:
  """Bag-averaged encoder features of the studies of one split.

  Attributes:
    features: [N, D] float64 mean of the encoder features over each study's bag.
    lvef: [N] labels (NaN when unlabelled).
    subjects: [N] pseudonymous subject ids.
  """

  features: np.ndarray
  lvef: np.ndarray
  subjects: list[str]


def parse_inits(values: Sequence[str]) -> dict[str, str]:
  """["NAME=INIT" or "INIT", ...] -> {name: init} (a bare INIT is named after itself).

  Raises:
    ValueError: on an empty name or init, or a name given twice.
  """
  out: dict[str, str] = {}
  for value in values:
    name, sep, init = value.partition("=")
    name, init = (name, init) if sep else (value, value)
    if not name or not init:
      raise ValueError(f"--init {value!r}: expected NAME=INIT or INIT")
    if name in out:
      raise ValueError(f"--init: the name {name!r} is given twice")
    out[name] = init
  return out


def pool(bank: inference.Bank) -> np.ndarray:
  """[N, K, D] bank features -> [N, D], the mean over each bag's valid instances."""
  mask = bank.mask[..., None].astype(np.float64)
  return (bank.features * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def encode_splits(init: str, data_dir: str, config: ml_collections.ConfigDict,
                  split_names: Sequence[str]) -> dict[str, PooledSplit]:
  """Pooled features of every study of each split under the encoder of `init`.

  Args:
    init: "random", "pretrain:WORKDIR[:STEP]", "kinetics:PATH" or "cmr_transformer:PATH"
      (`runs.encoder_init`).
    data_dir: the ingested dataset.
    config: a fine-tuning config giving the encoder geometry, crop and bag size (`config.model`,
      `config.data`); its `seed` seeds a random encoder.
    split_names: splits to encode.
  """
  mesh = sharding.make_mesh(config.mesh.to_dict())
  config = runs.with_init_input_norm(config, init)
  model = registry.lvef_model(config, 0.0)
  init_params = registry.lvef_init_fn(model, config)
  abstract = registry.abstract_params(init_params)
  params = nn.meta.unbox(jax.jit(init_params)(jax.random.key(config.seed)))
  params = {**params, **(runs.encoder_init(init, abstract) or {})}
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  encode = jax.jit(inference.make_encode_fn(model))
  out = {}
  for name in split_names:
    source = records.open_split(data_dir, name)
    with sharding.mesh_rules(mesh):
      bank = inference.build_bank(encode, params, inference.eval_dataset(source, config), mesh,
                                      what=f"{name} (probe)")
    order = np.argsort(bank.study_index, kind="stable")
    subjects = [source.metadata[int(i)]["subject_id"] for i in bank.study_index[order]]
    out[name] = PooledSplit(pool(bank)[order], bank.lvef[order], subjects)
  return out


def fit(features: np.ndarray, lvef: np.ndarray, subjects: Sequence[str],
        alphas: Sequence[float] = ALPHAS) -> tuple[sk_pipeline.Pipeline, float]:
  """Standardise + ridge, alpha by grouped cross-validation (mean absolute error).

  Returns:
    (the probe refitted on all rows, the chosen alpha).

  Raises:
    ValueError: with fewer than 2 labelled subjects (no cross-validation is possible).
  """
  keep = ~np.isnan(lvef)
  x, y = features[keep], lvef[keep]
  groups = np.asarray(subjects)[keep]
  n_groups = len(set(groups.tolist()))
  if n_groups < 2:
    raise ValueError(f"a linear probe needs labelled studies of at least 2 subjects, got "
                     f"{n_groups}")
  probe = sk_pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.Ridge())
  search = model_selection.GridSearchCV(
      probe, {"ridge__alpha": list(alphas)}, scoring="neg_mean_absolute_error",
      cv=model_selection.GroupKFold(min(MAX_FOLDS, n_groups)))
  search.fit(x, y, groups=groups)
  return search.best_estimator_, float(search.best_params_["ridge__alpha"])


def evaluate(pooled: dict[str, PooledSplit], *, train_split: str, eval_splits: Sequence[str],
             fractions: Sequence[float], n_boot: int = metrics.DEFAULT_BOOTSTRAP,
             salt: str = pipeline.LABEL_FRACTION_SALT) -> dict[str, Any]:
  """Probes fitted on each label fraction of `train_split`, scored on `eval_splits`.

  The label fraction keeps the subjects fine-tuning keeps (`pipeline`'s salt by default).

  Returns:
    {"results": {fraction: {"alpha", "n_train", split: metrics.with_ci(...)}}, "skipped": [...]}
    (a fraction that draws fewer than 2 labelled subjects is skipped, with the reason).
  """
  train = pooled[train_split]
  results: dict[str, Any] = {}
  skipped: list[str] = []
  for fraction in fractions:
    chosen = np.array([splits_lib.in_label_fraction(s, fraction, salt) for s in train.subjects])
    try:
      probe, alpha = fit(train.features[chosen], train.lvef[chosen],
                         [s for s, c in zip(train.subjects, chosen) if c])
    except ValueError as e:
      skipped.append(f"label fraction {fraction:g}: {e}")
      continue
    row: dict[str, Any] = {"alpha": alpha,
                           "n_train": int((chosen & ~np.isnan(train.lvef)).sum())}
    for name in eval_splits:
      split = pooled[name]
      keep = ~np.isnan(split.lvef)
      row[name] = metrics.with_ci(split.lvef[keep], probe.predict(split.features[keep]),
                                  [s for s, k in zip(split.subjects, keep) if k], n_boot=n_boot)
    results[f"{fraction:g}"] = row
  return {"results": results, "skipped": skipped}


def table(by_init: dict[str, dict[str, Any]], eval_splits: Sequence[str]) -> str:
  """Markdown: one row per (encoder, label fraction), MAE [95% CI] and AUC<40% per split."""
  head = "| encoder | label fraction | studies | " + " | ".join(
      f"{s} MAE | {s} AUC<40%" for s in eval_splits) + " |"
  rows = [head, "|---" * (3 + 2 * len(eval_splits)) + "|"]
  for init, result in by_init.items():
    for fraction, row in result["results"].items():
      cells = []
      for s in eval_splits:
        mae, auc = row[s]["mae"], row[s]["auc_lvef_below_40"]
        lo, hi = mae["ci"]
        cells.append(f"{mae['value']:.2f} [{lo:.2f}, {hi:.2f}] | {auc['value']:.3f}")
      rows.append(f"| {init} | {float(fraction):.0%} | {row['n_train']} | {' | '.join(cells)} |")
  return "\n".join(rows)
