"""What a dataset build's worker processes run: load one item and preprocess it.

Kept apart from `records` (ArrayRecord, flax, grain: ~3 s to import) so that a worker process
imports only the loading and preprocessing code: `records.build_dataset` starts its workers
with `spawn`, and each worker imports the modules of what it unpickles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from cmr_jax.data import preprocess
from cmr_jax.data import types


@dataclasses.dataclass(frozen=True)
class BuildItem:
  """One study to build: a name for messages (a pseudonym) and a picklable loader."""

  name: str
  load: Callable[[], types.Study]


@dataclasses.dataclass
class Built:
  """A worker's answer for one item: a record or the reason it failed."""

  name: str
  record: types.StudyRecord | None = None
  error: str = ""
  skipped_cines: list[str] = dataclasses.field(default_factory=list)


def build_one(item: BuildItem, cfg: preprocess.PreprocessConfig) -> Built:
  """Loads and preprocesses one item; any exception becomes the item's skip reason."""
  skipped_cines: list[str] = []
  try:
    record = preprocess.preprocess_study(item.load(), cfg, skipped_cines)
  except Exception as e:  # a bad item must not stop the build  # pylint: disable=broad-except
    return Built(item.name, error=f"{type(e).__name__}: {e}", skipped_cines=skipped_cines)
  return Built(item.name, record=record, skipped_cines=skipped_cines)
