"""Zero-shot video <-> report retrieval of a pre-training checkpoint on one dataset split.

Every study of the split with a report gives one eval clip (the pre-training pipeline's
deterministic pass: first cine of the bag order, centred crop) and its report; both are embedded
with the checkpoint's dual encoder. Video -> report retrieval ranks all reports of the split for
each video by cosine similarity (the embeddings are unit vectors), report -> video the reverse.
Ranks count the candidates scoring strictly higher than the true partner (as the pre-training
log's recall does), reported 1-based in the median.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np

from cmr_jax.data import records
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax import inference
from cmr_jax.models import registry
from cmr_jax import runs
from cmr_jax import sharding

KS = (1, 5, 10)
DIRECTIONS = ("video_to_report", "report_to_video")


def retrieval_metrics(emb_video: np.ndarray, emb_text: np.ndarray,
                      ks: tuple[int, ...] = KS) -> dict[str, Any]:
  """Recall@k and median rank in both directions for paired embeddings.

  Args:
    emb_video: [N, D] video embeddings.
    emb_text: [N, D] report embeddings; row i is the report of video i.
    ks: the k of recall@k.

  Returns:
    {"n": N, "video_to_report": {"recall_at_k": ..., "median_rank": ...},
     "report_to_video": {...}, "chance": {"recall_at_k": min(k, N) / N, "median_rank": ...}}.
  """
  emb_video, emb_text = np.asarray(emb_video), np.asarray(emb_text)
  if emb_video.ndim != 2 or emb_video.shape != emb_text.shape or not len(emb_video):
    raise ValueError(f"need paired [N, D] embeddings with N > 0, got {emb_video.shape} video "
                     f"and {emb_text.shape} report embeddings")
  n = len(emb_video)
  out: dict[str, Any] = {"n": n}
  for name, (query, target) in zip(DIRECTIONS, ((emb_video, emb_text), (emb_text, emb_video))):
    ranks = inference.retrieval_ranks(query, target)  # [N], 0 = best
    out[name] = {**{f"recall_at_{k}": float(np.mean(ranks < k)) for k in ks},
                 "median_rank": float(np.median(ranks + 1))}
  out["chance"] = {**{f"recall_at_{k}": min(k, n) / n for k in ks},
                   "median_rank": (n + 1) / 2}
  return out


def _tokenizer(config, workdir: str) -> tokenizer_lib.TextTokenizer:
  path = runs.tokenizer_path(config, workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: the pre-training run {workdir} kept no tokenizer")
  return tokenizer_lib.load_tokenizer(path)


def _check_reports(data_dir: str, split: str) -> None:
  info = records.read_dataset_info(data_dir)
  if split not in info["splits"]:
    raise KeyError(f"split {split!r} not in {data_dir}; it has {sorted(info['splits'])}")
  index = records.load_index(data_dir, split)
  if not any(m["has_report"] for m in index):
    raise ValueError(f"split {split!r} of {data_dir} has no study with a report ({len(index)} "
                     "studies): zero-shot video-report retrieval needs reports")


def embed_checkpoint(workdir: str, *, step: int | None = None, data_dir: str | None = None,
                     split: str = "test",
                     batch_size: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
  """Embeds the studies with a report of one split with a pre-training checkpoint.

  Args:
    workdir: the pre-training run directory (config.json, tokenizer/, checkpoints/).
    step: the checkpoint step; None for the latest.
    data_dir: the dataset; None for the run's own (config.data.dir).
    split: the split to embed.
    batch_size: global eval batch size; None for the run's config.eval_batch_size. Must divide
      over this machine's devices.

  Returns:
    (step, video embeddings [N, D], report embeddings [N, D]) in split order.

  Raises:
    ValueError: for a video-video run, a split without reports, or a checkpoint whose
      parameters do not match the run's config.
    FileNotFoundError: for a directory without config, tokenizer or checkpoints.
  """
  config = runs.load_config(workdir)
  if config.model.two_clips:
    raise ValueError(f"{workdir} pre-trained video against video (config.model.two_clips): it "
                     "has no report encoder for video-report retrieval")
  data_dir = data_dir or config.data.dir
  _check_reports(data_dir, split)
  tok = _tokenizer(config, workdir)
  model = registry.pretrain_model(config, tok.vocab_size)
  step, params = runs.restore_params(workdir, step=step)
  runs.check_fit(registry.abstract_params(registry.pretrain_init_fn(model, config)), params,
                 f"the step-{step} checkpoint of {workdir} does not match its config.json")
  config.eval_batch_size = batch_size or config.eval_batch_size
  mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  embed_fn = jax.jit(inference.make_embed_fn(model, two_clips=False))
  logging.info("embedding split %s of %s with step %d of %s", split, data_dir, step, workdir)
  with sharding.mesh_rules(mesh):
    video, text = inference.embed_split(embed_fn, params, records.open_split(data_dir, split),
                                        config, tok, mesh)
  return step, video, text


def evaluate(workdir: str, *, step: int | None = None, data_dir: str | None = None,
             split: str = "test", batch_size: int | None = None,
             ks: tuple[int, ...] = KS) -> dict[str, Any]:
  """Zero-shot retrieval metrics (see `retrieval_metrics`) of one checkpoint on one split."""
  data_dir = data_dir or runs.load_config(workdir).data.dir
  step, video, text = embed_checkpoint(workdir, step=step, data_dir=data_dir, split=split,
                                       batch_size=batch_size)
  out = {"workdir": workdir, "step": step, "split": split, "data_dir": data_dir}
  out.update(retrieval_metrics(video, text, ks))
  return out


def table(result: dict[str, Any]) -> str:
  """A Markdown table of a result of `evaluate` (one row per direction, chance last)."""
  ks = sorted(int(k.rsplit("_", 1)[1]) for k in result["chance"] if k.startswith("recall_at_"))
  head = "| direction | " + " | ".join(f"R@{k}" for k in ks) + " | median rank |"
  rows = [head, "|---" * (len(ks) + 2) + "|"]
  for name in (*DIRECTIONS, "chance"):
    r = result[name]
    rows.append(f"| {name.replace('_', ' ')} | "
                + " | ".join(f"{r[f'recall_at_{k}']:.3f}" for k in ks)
                + f" | {r['median_rank']:.1f} |")
  return "\n".join(rows)
