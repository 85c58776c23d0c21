r"""The one-process reference of tests/test_multihost.py: `tools/train.py` reading N shards at once.

  python -m tests.multihost_reference --reference_shards=2 <the flags of tools/train.py>

A run of N processes feeds each step the concatenation, in process order, of the per-process
batches of its N data shards (`pipeline.pretrain_dataset(shard_index=i, shard_count=N)`, and
`pipeline.finetune_dataset` alike for fine-tuning and its evaluations). Here
one process builds those N shards itself, zips them and concatenates each step's batches, so its
global batches (train and eval) are exactly those of the N-process run; everything else is
`tools/train.py` unchanged.
"""

from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from cmr_jax.data import pipeline
from cmr_jax import logs
from tools import train as train_program

_SHARDS = flags.DEFINE_integer("reference_shards", 2, "processes of the run to reproduce")


def _concatenate(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def side_by_side(build: Callable[..., grain.IterDataset], shards: int) -> Callable[..., Any]:
  """Wraps a pipeline builder: one process's dataset becomes the zip of `shards` shards."""

  def dataset(source, *, batch_size: int, shard_index: int = 0, shard_count: int = 1,
              **kwargs) -> grain.IterDataset:
    if (shard_index, shard_count) != (0, 1):
      raise ValueError("the reference runs as one process")
    if batch_size % shards:
      raise ValueError(f"batch {batch_size} is not divisible by {shards} shards")
    parts = [build(source, batch_size=batch_size // shards, shard_index=i, shard_count=shards,
                   **kwargs) for i in range(shards)]
    return grain.experimental.ZipIterDataset(parts).map(_concatenate)

  return dataset


def main() -> None:
  pipeline.pretrain_dataset = side_by_side(pipeline.pretrain_dataset, _SHARDS.value)
  pipeline.finetune_dataset = side_by_side(pipeline.finetune_dataset, _SHARDS.value)
  train_program.main()


if __name__ == "__main__":
  logs.run(main)
