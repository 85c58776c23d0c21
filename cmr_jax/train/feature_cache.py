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

import dataclasses
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cmr_jax.train import common

LOG_EVERY_S = 30.0


@dataclasses.dataclass
class Bank:
  """Encoder features of study bags.

  Attributes:
    features: [N, K, D] float32 encoder outputs per instance (zeros at padding).
    mask: [N, K] bool, the valid instances.
    lvef: [N] float32 labels (NaN when unlabelled).
    study_index: [N] int32 index of each study in its split.
    view: [N, K] int32 view codes.
  """

  features: np.ndarray
  mask: np.ndarray
  lvef: np.ndarray
  study_index: np.ndarray
  view: np.ndarray

  def __len__(self) -> int:
    return int(self.lvef.shape[0])

  @property
  def nbytes(self) -> int:
    return int(self.features.nbytes)


def make_encode_fn(model) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, video uint8 [B, K, T, H, W]) -> frozen encoder features [B, K, D] (float32)."""

  def encode(params, video):
    bags, instances = video.shape[:2]
    feats = model.apply({"params": params}, video.reshape(bags * instances, *video.shape[2:]),
                        method=lambda m, v: m.video_encoder(v, train=False))
    return feats.reshape(bags, instances, -1).astype(jnp.float32)

  return encode


def build_bank(encode_fn, params, dataset, mesh: jax.sharding.Mesh, *, what: str,
               expected_batches: int | None = None) -> Bank:
  """Encodes every batch of `dataset` (global batches over `mesh`); keeps the valid rows.

  Every process ends up with the whole bank (features are gathered across processes).
  """
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
  cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                       ("features", "mask", "lvef", "study_index", "view")}
  t0 = last = time.time()
  for i, batch in enumerate(common.global_batches(iter(dataset), mesh)):
    feats = encode_fn(params, batch["video"])
    valid = gather(batch["valid"])
    cols["features"].append(gather(feats)[valid])
    for key in ("mask", "lvef", "study_index", "view"):
      cols[key].append(gather(batch[key])[valid])
    if time.time() - last > LOG_EVERY_S:
      last = time.time()
      rate = (i + 1) / (last - t0)
      eta = (f", ETA {(expected_batches - i - 1) / rate / 60:.1f} min"
             if expected_batches else "")
      logging.info("caching %s features: %d batches, %.2f batches/s%s", what, i + 1, rate, eta)
  if not cols["features"]:
    raise ValueError(f"no {what} study to cache features of")
  bank = Bank(**{k: np.concatenate(v) for k, v in cols.items()})
  bank.mask = bank.mask.astype(bool)
  logging.info("cached %s features of %d bags (%.1f MB) in %.0f s", what, len(bank),
               bank.nbytes / 2**20, time.time() - t0)
  return bank


def batch_at(bank: Bank, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """This process's slice of the global batch of `step`: a function of (seed, step) only."""
  rng = np.random.default_rng([seed, step])
  rows = rng.choice(len(bank), size=batch_size, replace=len(bank) < batch_size)
  local = common.per_process_batch(batch_size)
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


def predict_bank(predict_fn, params, bank: Bank, mesh: jax.sharding.Mesh,
                 batch_size: int) -> dict[str, np.ndarray]:
  """Per-study predictions on a bank, as `finetune.predict_split` returns them."""
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

