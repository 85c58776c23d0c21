"""Frozen-encoder fine-tuning on cached encoder features.

With the encoder frozen (modes `linear` and `finetune`) every training step recomputes the same
function of its input: the encoder's features. This module computes them once, for `passes`
augmented passes over the labelled training studies (a "bank" [passes * N, K, D]) and one
deterministic pass over the validation split, and then trains the head (`video_proj`, gated
attention MIL, regressor) on batches drawn from the bank: thousands of head steps cost less than
one encoder pass, so a CPU can afford the head's full budget and a GPU run spends its time on the
encoder passes only. The model, optimizer state and checkpoints are those of the ordinary loop
(the encoder's weights are in the state, frozen), so `Predictor` and resumption are unchanged.

Batches are a function of (seed, step) alone, and the bank is rebuilt identically on resumption
(frozen weights, seeded augmentation), so a resumed run repeats an unbroken one exactly.
Memory: every process holds the bank, passes * N * K * D * 4 bytes (e.g. 4 passes of 20k UK
Biobank studies x 16 cines x 768 features = 3.9 GB); use fewer passes or the streaming loop
(`feature_cache.passes = 0`) beyond that.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from cmr_jax import inference
from cmr_jax import sharding

def batch_at(bank: inference.Bank, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """This process's slice of the global batch of `step`: a function of (seed, step) only."""
  rng = np.random.default_rng([seed, step])
  rows = rng.choice(len(bank), size=batch_size, replace=len(bank) < batch_size)
  local = sharding.per_process_batch(batch_size)
  rows = rows[jax.process_index() * local:(jax.process_index() + 1) * local]
  return {"features": bank.features[rows], "mask": bank.mask[rows], "lvef": bank.lvef[rows]}


def head_forward(model):
  """(params, feature batch, rng) -> LVEF [B]: the head alone, in training mode (dropout)."""

  def forward(params, batch, rng):
    pred, _ = model.apply({"params": params}, batch["features"], batch["mask"], train=True,
                          rngs={"dropout": rng}, method="predict_from_features")
    return pred

  return forward


def make_predict_fn(model):
  """(params, features [B, K, D], mask [B, K]) -> (lvef [B], attention [B, K])."""

  def predict(params, features, mask):
    return model.apply({"params": params}, features, mask, method="predict_from_features")

  return predict


def predict_bank(predict_fn, params, bank: inference.Bank, mesh: jax.sharding.Mesh,
                 batch_size: int) -> dict[str, np.ndarray]:
  """Per-study predictions on a bank, as `inference.predict_split` returns them."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  preds, attention = [], []
  for start in range(0, len(bank), batch_size):
    rows = slice(start, start + batch_size)
    feats = jax.device_put(bank.features[rows], replicated)
    mask = jax.device_put(bank.mask[rows], replicated)
    p, a = predict_fn(params, feats, mask)
    preds.append(np.asarray(jax.device_get(p)))
    attention.append(np.asarray(jax.device_get(a)))
  return {"study_index": bank.study_index, "lvef": bank.lvef, "pred": np.concatenate(preds),
          "attention": np.concatenate(attention), "view": bank.view}


class CachedFeatures:
  """The frozen encoder's features of `passes` augmented passes over the labelled training bags
  and of one deterministic validation pass, computed once; the head trains on them (a fine-tuning
  `Feed`)."""

  iterator = None  # batches are a function of the step: no input state to checkpoint

  def __init__(self, model, params: Any, train_ds, val_source,
               config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, passes: int, *,
               n_bags: int):
    encode = jax.jit(inference.make_encode_fn(model))
    self._train = inference.build_bank(
        encode, params, train_ds, mesh, what=f"training ({passes} augmented passes)",
        expected_batches=passes * n_bags // config.batch_size)
    self._val = inference.build_bank(encode, params, inference.eval_dataset(val_source, config),
                                     mesh, what="validation")
    self.forward = head_forward(model)
    self._predict = jax.jit(make_predict_fn(model))
    self._config, self._mesh = config, mesh

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return batch_at(self._train, step, self._config.batch_size, self._config.seed)

  def validate(self, params: Any) -> dict[str, np.ndarray]:
    return predict_bank(self._predict, params, self._val, self._mesh,
                        self._config.eval_batch_size)
