"""Inference: a trained model run over a dataset, the one place that does it.

- LVEF: `Predictor` (a fine-tuning run's checkpoint as a function of study records), the
  per-split pass it makes (`predict_split`: deterministic, or seeded test-time augmentation) and
  `tta_predictions`, the mean over augmented passes that evaluation and prediction report;
- encoder features of every bag of a dataset (`build_bank`: the frozen encoder's outputs, for
  cached-feature fine-tuning and linear probes);
- dual-encoder embeddings of a split (`embed_split`) and video->report retrieval ranks, for the
  zero-shot checks of pre-training and its evaluator.
Trainers validate with these functions; evaluators and prediction call them on restored runs
(`cmr_jax.runs`). Multi-host: every process feeds its shard and gets the gathered result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable, TypeVar

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmr_jax.data import pipeline
from cmr_jax.data import records
from cmr_jax.data import types
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax import sharding

LOG_EVERY_S = 30.0
T = TypeVar("T")


def _gather(x) -> np.ndarray:
  """A process-sharded array, gathered whole onto every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def eval_input_options(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Worker processes, read threads and prefetch of evaluation passes (config.data's
  eval_worker_count, read_threads, prefetch_buffer_size; configs without them: 0, 2, 4)."""
  return {"worker_count": data.get("eval_worker_count", 0),
          "read_threads": data.get("read_threads", 2),
          "prefetch_buffer_size": data.get("prefetch_buffer_size", 4)}


def eval_dataset(source, config: ml_collections.ConfigDict, tta_sample: int = 0):
  """One pass over every study of `source` in this process's shard: deterministic (0), or
  seeded by `tta_sample` > 0 with the training augmentation."""
  d = config.data
  return pipeline.finetune_dataset(
      source, image_size=d.image_size, num_frames=d.num_frames,
      batch_size=sharding.per_process_batch(config.eval_batch_size),
      max_instances=d.max_instances, seed=tta_sample, train=False,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      eval_augment=tta_sample > 0, **eval_input_options(d))


def make_predict_fn(model):
  """(params, batch) -> (lvef [B], attention weights [B, K])."""

  def predict(params, batch):
    return model.apply({"params": params}, batch["video"], batch["mask"], train=False)

  return predict


def predict_split(predict_fn, params, source, config, mesh, *,
                  tta_sample: int = 0) -> dict[str, np.ndarray]:
  """One pass over `source`: per-study predictions, labels and attention.

  tta_sample 0 is the deterministic pass (centred crops); k > 0 samples every clip with the
  training augmentation, seeded by k (test-time augmentation).
  """
  ds = eval_dataset(source, config, tta_sample)
  cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                       ("study_index", "lvef", "pred", "attention", "view")}
  for batch in sharding.global_batches(iter(ds), mesh):
    pred, attention = predict_fn(params, batch)
    valid = _gather(batch["valid"])
    for key, value in (("study_index", batch["study_index"]), ("lvef", batch["lvef"]),
                       ("pred", pred), ("attention", attention), ("view", batch["view"])):
      cols[key].append(_gather(value)[valid])
  out = {k: np.concatenate(v) for k, v in cols.items()}
  order = np.argsort(out["study_index"], kind="stable")
  return {k: v[order] for k, v in out.items()}


class Predictor:
  """A fine-tuning run's checkpoint as a function: study records -> LVEF and attention.

  Attributes:
    config: the run's config.
    preprocess: the preprocessing its training data had (apply it to new studies).
    best: the best checkpoint's validation errors (`best.json`), or None.
    workdir: the run folder.
  """

  def __init__(self, workdir: str, *, which: str = runs.BEST_DIR):
    self.workdir = workdir
    self.config, self._params = runs.restore_finetuned(workdir, which=which)
    self.preprocess = runs.read_preprocess(workdir)
    self.best = runs.read_best(workdir)
    model = registry.lvef_model(self.config, mean=0.0)  # the bias is restored, not re-initialised
    self._mesh = sharding.make_mesh(self.config.mesh.to_dict())
    # Replicated over this machine's mesh, whatever mesh trained the model.
    self._params = jax.device_put(self._params, jax.sharding.NamedSharding(
        self._mesh, jax.sharding.PartitionSpec()))
    self._fn = jax.jit(make_predict_fn(model))

  def __call__(self, source: pipeline.Source, *, tta_sample: int = 0) -> dict[str, np.ndarray]:
    """Per-study arrays sorted by index in `source` (a split, or a list of StudyRecords):
    study_index, lvef (NaN if unlabelled), pred, attention [N, K], view [N, K].
    `tta_sample` > 0: a seeded augmented pass (see `predict_split`)."""
    with sharding.mesh_rules(self._mesh):
      return predict_split(self._fn, self._params, source, self.config, self._mesh,
                           tta_sample=tta_sample)


def predict_run(workdir: str, data_dir: str, split: str, *, which: str = runs.BEST_DIR,
                tta_sample: int = 0) -> dict[str, np.ndarray]:
  """Predictions of a fine-tuning run's checkpoint on one split of a dataset (see Predictor)."""
  return Predictor(workdir, which=which)(records.open_split(data_dir, split),
                                         tta_sample=tta_sample)


def tta_predictions(predictor: Predictor, source: pipeline.Source,
                    passes: int) -> dict[str, np.ndarray]:
  """Per-study means over `passes` prediction passes (see the module docstring).

  Returns:
    study_index [N], lvef [N] (NaN if unlabelled), pred [N], pred_sd [N] (SD over passes, 0 for
    one pass), attention [N, K] and view [N, K] (VIEW_CODES, -1 at padding).
  """
  runs = []
  start = time.monotonic()
  for k in range(passes):
    runs.append(predictor(source, tta_sample=k))
    done = time.monotonic() - start
    logging.log_every_n_seconds(
        logging.INFO, "prediction pass %d/%d: %d studies, %.1f studies/s, ETA %.0f s",
        LOG_EVERY_S, k + 1, passes, len(runs[-1]["pred"]),
        (k + 1) * len(runs[-1]["pred"]) / max(done, 1e-9), done / (k + 1) * (passes - k - 1))
  first = runs[0]
  for run in runs[1:]:
    if not (np.array_equal(run["study_index"], first["study_index"])
            and np.array_equal(run["view"], first["view"])):
      raise RuntimeError("test-time augmentation passes disagree on the studies or their bags")
  preds = np.stack([r["pred"] for r in runs])  # [passes, N]
  return {"study_index": first["study_index"], "lvef": first["lvef"], "view": first["view"],
          "pred": preds.mean(axis=0), "pred_sd": preds.std(axis=0),
          "attention": np.mean([r["attention"] for r in runs], axis=0)}



# --- Leave-one-cine-out bags: what prediction, calibration and evaluation score per study. ---

def _sax_with_bag(sax: list[int], wanted: list[int]) -> list[int]:
  """SAX cines of the stack `sax` (base to apex) whose bag SAX slices are exactly `wanted`.

  `wanted` are bag slices (at least two stack positions apart) in stack order. Up to three
  are interleaved with one unused slice each (at most 5 slices: not trimmed, every second from
  the first); more get an unused slice before the first and after the last as well (more than
  5: trimmed, then every second). See `pipeline.bag_indices`.
  """
  if not wanted:
    return []
  at = [sax.index(i) for i in wanted]
  core = [c for p in at[:-1] for c in (sax[p], sax[p + 1])] + [wanted[-1]]
  if len(core) <= pipeline.TRIM_SAX_ABOVE:
    return core
  return [sax[at[0] - 1]] + core + [sax[at[-1] + 1]]


def leave_one_out_cines(views: Sequence[str], slice_index: np.ndarray,
                        max_instances: int) -> list[list[int]]:
  """Cine subsets whose bags are the study's bag without one cine each (in bag order).

  `pipeline.bag_indices` takes every second SAX slice, of the stack without its first and last
  slice when it has more than 5: each subset keeps the other bag cines and just enough unused
  SAX slices around them that the rule picks those again, and no slice beyond `max_instances`
  slides in.

  Args:
    views: [N] view of each cine.
    slice_index: [N] SAX order base->apex (-1 for long-axis).
    max_instances: K, the bag size.

  Returns:
    Sorted cine indices per left-out bag cine; [] for a bag of one cine.
  """
  bag = pipeline.bag_indices(list(views), slice_index, max_instances)
  if len(bag) < 2:
    return []
  sax = sorted((i for i, v in enumerate(views) if v == types.SAX), key=lambda i: slice_index[i])
  lax = [i for i in bag if views[i] != types.SAX]
  sax_in_bag = [i for i in bag if views[i] == types.SAX]
  return [sorted([j for j in lax if j != i]
                 + _sax_with_bag(sax, [j for j in sax_in_bag if j != i])) for i in bag]


def subset_record(record: types.StudyRecord, cines: Sequence[int]) -> types.StudyRecord:
  """The record with only `cines` (indices), in that order; no checksum."""
  idx = np.asarray(cines, dtype=np.int64)
  return dataclasses.replace(
      record, frames=record.frames[idx], views=[record.views[i] for i in cines],
      slice_index=record.slice_index[idx], slice_position_mm=record.slice_position_mm[idx],
      source_spacing_mm=record.source_spacing_mm[idx], checksum="")


@dataclasses.dataclass(frozen=True)
class BagSource:
  """A `pipeline.Source` of records, each whole or cut to some cines when read."""

  items: list[tuple[types.StudyRecord, list[int] | None]]

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> types.StudyRecord:
    record, cines = self.items[index]
    return record if cines is None else subset_record(record, cines)


def jackknife_se(preds: np.ndarray) -> float:
  """Jackknife standard error from the n leave-one-out estimates."""
  n = preds.size
  return float(math.sqrt((n - 1) / n * np.sum((preds - preds.mean()) ** 2)))


BAGS_PER_CALL = 4  # bags scored per Predictor call, in eval batches


def bag_outputs(predictor: Predictor, items: Iterable[T], *,
                record_of: Callable[[T], types.StudyRecord | None] = lambda item: item,
                loo: bool = True, tta: int = 1) -> Iterator[tuple[T, dict[str, np.ndarray] | None]]:
  """Each item with the outputs of its study's bags, in order, scoring a few batches at a time.

  Args:
    predictor: the fine-tuned model.
    items: anything holding a study record (`record_of`; None: nothing to score).
    record_of: the record of an item.
    loo: also score the leave-one-cine-out bags (bag size + 1 bags per study).
    tta: prediction passes averaged per bag: the deterministic pass and tta - 1 samplings with
      the training augmentation (seeded, so a re-run gives the same numbers).

  Yields:
    (item, out): out["pred"] [1 + L] and out["attention"] [1 + L, K], the full bag first, then
    its L leave-one-cine-out bags (`leave_one_out_cines`); None for an item without a record.
  """
  if tta < 1:
    raise ValueError(f"tta must be at least 1, got {tta}")
  k = int(predictor.config.data.max_instances)
  per_call = BAGS_PER_CALL * predictor.config.eval_batch_size
  pending: list[tuple[T, int]] = []  # (item, its number of bags)
  bags: list[tuple[types.StudyRecord, list[int] | None]] = []

  def flush():
    out = tta_predictions(predictor, BagSource(bags), tta) if bags else {}
    if bags and len(out["pred"]) != len(bags):
      raise RuntimeError(f"the predictor returned {len(out['pred'])} rows for {len(bags)} bags")
    start = 0
    for item, n in pending:
      yield item, ({"pred": out["pred"][start:start + n],
                    "attention": out["attention"][start:start + n]} if n else None)
      start += n
    pending.clear()
    bags.clear()

  for item in items:
    record = record_of(item)
    n = 0
    if record is not None:
      variants = leave_one_out_cines(record.views, record.slice_index, k) if loo else []
      bags.extend([(record, None)] + [(record, v) for v in variants])
      n = 1 + len(variants)
    pending.append((item, n))
    if len(bags) >= per_call:
      yield from flush()
  yield from flush()


def study_predictions(predictor: Predictor, source: pipeline.Source, *, tta: int = 1,
                      loo: bool = True) -> dict[str, np.ndarray]:
  """Per-study predictions of a split as prediction makes them (`bag_outputs`).

  Returns:
    lvef [N] (NaN if unlabelled), pred [N] (the full bag's), loo_se [N] (jackknife SE over the
    leave-one-cine-out bags; NaN for a bag of one cine or without `loo`), in source order.
  """
  lvef, pred, loo_se = [], [], []
  for record, out in bag_outputs(predictor, (source[i] for i in range(len(source))), loo=loo,
                                 tta=tta):
    lvef.append(float(record.lvef) if record.has_labels else np.nan)
    pred.append(float(out["pred"][0]))
    loo_se.append(jackknife_se(out["pred"][1:]) if out["pred"].size > 1 else np.nan)
  return {"lvef": np.array(lvef), "pred": np.array(pred), "loo_se": np.array(loo_se)}


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
  cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                       ("features", "mask", "lvef", "study_index", "view")}
  t0 = last = time.time()
  for i, batch in enumerate(sharding.global_batches(iter(dataset), mesh)):
    feats = encode_fn(params, batch["video"])
    valid = _gather(batch["valid"])
    cols["features"].append(_gather(feats)[valid])
    for key in ("mask", "lvef", "study_index", "view"):
      cols[key].append(_gather(batch[key])[valid])
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


def model_inputs(batch: dict[str, jax.Array], two_clips: bool) -> dict[str, jax.Array]:
  if two_clips:
    return {"video": batch["video"], "video2": batch["video2"]}
  return {"video": batch["video"], "text_ids": batch["text_ids"], "text_mask": batch["text_mask"]}


def make_embed_fn(model, two_clips: bool):
  """(params, batch) -> (video embeddings, paired embeddings) at eval."""

  def embed(params, batch):
    emb_a, emb_b, _ = model.apply({"params": params}, **model_inputs(batch, two_clips),
                                  train=False)
    return emb_a, emb_b

  return embed


def embed_split(embed_fn, params, source, config, tok,
                mesh) -> tuple[np.ndarray, np.ndarray]:
  """(video [N, D], paired [N, D]) embeddings of one eval pass of `source`, on every process."""
  d = config.data
  ds = pipeline.pretrain_dataset(
      source, image_size=d.image_size, num_frames=d.num_frames,
      batch_size=sharding.per_process_batch(config.eval_batch_size), tokenizer=tok,
      max_text_len=config.text.max_len, seed=0, train=False,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      two_clips=config.model.two_clips, max_sentences=config.text.max_sentences,
      **eval_input_options(d))
  video, paired = [], []
  for batch in sharding.global_batches(iter(ds), mesh):
    a, b = embed_fn(params, batch)
    valid = _gather(batch["valid"])
    video.append(_gather(a)[valid])
    paired.append(_gather(b)[valid])
  return np.concatenate(video), np.concatenate(paired)


RANK_BLOCK_ROWS = 2048  # query rows per similarity block: memory O(block x N), not O(N^2)


def retrieval_ranks(emb_query: np.ndarray, emb_target: np.ndarray, *,
                    block_rows: int = RANK_BLOCK_ROWS,
                    across_processes: bool = False) -> np.ndarray:
  """Rank (0 = best) of each query's own target (same row) among all targets, by dot product.

  The similarities are computed a block of query rows at a time (at 100k studies the full
  N x N matrix would take 40 GB). With `across_processes` (every process holding the same
  embeddings and calling this together) each process ranks an equal share of the queries and
  the ranks are gathered, so no process computes more than its share.

  Args:
    emb_query: [N, D] query embeddings.
    emb_target: [N, D] target embeddings; row i is the match of query i.
    block_rows: query rows per block.
    across_processes: split the work over the processes of a multi-host run.

  Returns:
    [N] integer ranks: how many targets score strictly higher than the own one.
  """
  emb_query, emb_target = np.asarray(emb_query), np.asarray(emb_target)
  n = len(emb_query)
  count = jax.process_count() if across_processes else 1
  share = -(-n // count) if n else 0
  lo = min(n, (jax.process_index() if across_processes else 0) * share)
  hi = min(n, lo + share)
  ranks = np.full(share, -1, np.int64)
  for start in range(lo, hi, block_rows):
    stop = min(start + block_rows, hi)
    sims = emb_query[start:stop] @ emb_target.T  # [b, N]
    own = sims[np.arange(stop - start), np.arange(start, stop)]
    ranks[start - lo:stop - lo] = (sims > own[:, None]).sum(axis=1)
  if count > 1:
    ranks = np.asarray(multihost_utils.process_allgather(ranks, tiled=True))
  return ranks[:n]


def recall_at_k(emb_video: np.ndarray, emb_text: np.ndarray, ks=(1, 5), *,
                across_processes: bool = False) -> dict[str, float]:
  """Video -> report retrieval: fraction of videos whose own report ranks within the top k
  (`retrieval_ranks`, its work shared by the processes with `across_processes`)."""
  rank = retrieval_ranks(emb_video, emb_text, across_processes=across_processes)
  return {f"recall_at_{k}": float(np.mean(rank < k)) for k in ks}
