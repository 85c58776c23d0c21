"""Study records on disk: serialisation, sharded ArrayRecord datasets, parallel building.

Layout of a dataset directory:
  {split}.array_record-{i:05d}-of-{n:05d}   ArrayRecord shards (group_size:1: random access),
                                            one record per study: the whole record, or only its
                                            header when the split's layout is "cines" (below)
  {split}.index.json                        light per-record metadata in read order (ids, site,
                                            visit, labels, views): lets the input pipelines
                                            filter and subset without decoding pixels
  {split}.cines.array_record-{i:05d}-of-{n:05d}
                                            optional per-cine shards (listed in dataset_info as
                                            the split's "cine_files"): shard i holds, for each
                                            study of study shard i in order, its record without
                                            pixels (frames [N, 0, 0, 0]) then its N cines, one
                                            record each, so a reader touches only the cines it uses
  dataset_info.json                         preprocess config, counts per split and site, label
                                            statistics, skipped items with reasons, duplicates,
                                            each split's "layout" (`LAYOUTS`)

Each record is a msgpack map (`flax.serialization`) of numpy arrays, strings and floats: exact
round trip, no pickle. Measured on a 2-core shared CPU for a 13-cine 16x112x112 study (2.6 MB):
msgpack encode 1.3 ms / decode 0.3 ms (zero-copy), against numpy .npz in memory 2.3 / 3.1 ms.
Files are written directly with array_record and read through
`grain.sources.ArrayRecordDataSource`: random-access reads of such records ran at ~550 records/s
uncompressed; a TFDS copy of the same records read through `tfds.data_source` was 2.7x (pixels
as one bytes feature) to 8.5x (TFDS's tensor encoding) slower (`tools/bench_tfds.py`, README
"Ingestion speed and TFDS"), so TFDS is not used. On phantom records (read + decode,
busy machine) uncompressed gave 335/s, snappy 112/s at 0.63 of the size, zstd:1 84/s at 0.54:
uncompressed is the default, `writer_options` trades read speed for disk. Riegeli's per-chunk
hashes catch corrupted bytes on read; such errors are re-raised naming the split, record index,
shard file and position.

Pre-training uses one cine of a study's ~13: reading the whole record (~10 MB at 224 px) cost
~5 CPU ms unloaded (15 busy) per clip, so `build_dataset` writes the per-cine shards above and
`StudySource.study_cines` reads a study's header and then only the cines asked for. The pixels
are stored once, there (layout "cines"): the study shards hold the headers only, and
`StudySource[i]` assembles the whole record from the header and all its cines, equal to the
stored whole record. On the 224 px phantom set of tools/bench_input.py (40 studies of 14 cines,
16x224x224, 11.2 MB a record) a split took 430.8 MB instead of 861.3 MB, and a whole study read
in 3.2 CPU ms instead of 4.4 (shared 2-core CPU under load ~4.9, no GPU; header + one cine 0.23
ms either way). `cine_shards=False` writes whole records only (layout "whole", 430.6 MB there);
`pixels_twice=True` writes both, as builds did before. Datasets of layout "whole" (older builds,
recorded without a layout; the Beam runner) are read from their whole records, as before.

A dataset folder may be a gs:// (s3://) URL: dataset_info.json and the indices are read from it
directly, but array_record reads local files only, so `StudySource` stages the shards of a split
it opens into this host's cache folder (`files.local_copy`, $CMR_JAX_CACHE_DIR). Building writes
a local folder (copy it to the bucket afterwards).
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import time
from typing import Any, Callable

from absl import logging
from array_record.python import array_record_module
import grain
import numpy as np

from cmr_jax import files
from cmr_jax.data import building
from cmr_jax.data import codec
from cmr_jax.data import preprocess
from cmr_jax.data import types

BUILDER_VERSION = "1.0.0"
RECORD_FORMAT = codec.RECORD_FORMAT
DATASET_INFO = "dataset_info.json"
INDEX_SUFFIX = ".index.json"
SHARD_PATTERN = "{split}.array_record-{index:05d}-of-{count:05d}"
CINE_SHARD_PATTERN = "{split}.cines.array_record-{index:05d}-of-{count:05d}"
# One record per chunk: random access without decoding neighbours. Uncompressed reads ~4x faster
# than zstd here; pass e.g. "group_size:1,zstd:1" to trade read speed for disk.
DEFAULT_WRITER_OPTIONS = "group_size:1,uncompressed"
# A split's "layout" in dataset_info.json: where its pixels are. "whole": the study shards hold
# whole records (per-cine shards, if listed, hold a copy; the only layout before 2026-12, so an
# absent field means it). "cines": the study shards hold the headers only, the pixels are in the
# per-cine shards alone.
LAYOUT_WHOLE = "whole"
LAYOUT_CINES = "cines"
LAYOUTS = (LAYOUT_WHOLE, LAYOUT_CINES)
# Work queued per worker process: bounds memory while keeping the workers busy.
_IN_FLIGHT_PER_WORKER = 4

CorruptRecordError = codec.CorruptRecordError
serialize_record = codec.serialize_record
deserialize_record = codec.deserialize_record
serialize_cine_records = codec.serialize_cine_records
deserialize_cine = codec.deserialize_cine
record_metadata = codec.record_metadata


BuildItem = building.BuildItem


@dataclasses.dataclass
class BuildSummary:
  """What a build did: counts per split, skipped items and duplicates with reasons."""

  out_dir: str
  num_items: int
  counts: dict[str, int]
  skipped: list[dict[str, str]]
  duplicates: list[dict[str, str]]
  skipped_cines: list[str]
  elapsed_s: float

  @property
  def num_written(self) -> int:
    return sum(self.counts.values())

  @property
  def items_per_s(self) -> float:
    return self.num_items / max(self.elapsed_s, 1e-9)


def as_build_items(items: collections.abc.Iterable[Any]) -> list[BuildItem]:
  """Normalises items: `BuildItem`s, (name, loader) pairs, or bare loaders (named item-<i>)."""
  out = []
  for i, item in enumerate(items):
    if isinstance(item, BuildItem):
      out.append(item)
    elif isinstance(item, tuple) and len(item) == 2 and callable(item[1]):
      out.append(BuildItem(str(item[0]), item[1]))
    elif callable(item):
      out.append(BuildItem(f"item-{i}", item))
    else:
      raise TypeError(f"build item {i} is neither a BuildItem, a (name, loader) pair nor callable")
  return out


_Built = building.Built
_build_one = building.build_one


def _built_in_order(items: list[BuildItem], cfg: preprocess.PreprocessConfig,
                    num_workers: int) -> collections.abc.Iterator[_Built]:
  """Yields `_build_one` for every item, in item order, over `num_workers` processes.

  An item whose work cannot come back (its loader does not pickle, or its worker process dies,
  e.g. a decoder crashing on a corrupt file) is yielded as failed. When a worker dies, the items
  that were in flight are re-run one at a time in a fresh pool, so that only the item that
  kills a worker is blamed.
  """
  if num_workers <= 0:
    for item in items:
      yield _build_one(item, cfg)
    return
  context = multiprocessing.get_context("spawn")  # no fork of a process that may run jax threads
  new_pool = lambda: concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
  pool = new_pool()
  pending: collections.deque[tuple[int, concurrent.futures.Future[_Built]]] = collections.deque()
  position = 0  # next item to submit
  one_at_a_time_until = 0  # items before this index run alone (after a worker died)
  try:
    while pending or position < len(items):
      window = 1 if position < one_at_a_time_until else num_workers * _IN_FLIGHT_PER_WORKER
      while position < len(items) and len(pending) < window:
        pending.append((position, pool.submit(_build_one, items[position], cfg)))
        position += 1
      index, future = pending.popleft()
      try:
        yield future.result()
      except concurrent.futures.process.BrokenProcessPool as e:
        pool.shutdown(cancel_futures=True)
        pool = new_pool()
        if pending:  # several items were in flight: find the culprit by re-running them alone
          one_at_a_time_until, position = position, index
          pending.clear()
        else:
          yield _Built(items[index].name, error=f"its worker process died ({e})")
      except Exception as e:  # e.g. the loader could not be pickled
        yield _Built(items[index].name, error=f"{type(e).__name__}: {e}")
  finally:
    pool.shutdown(cancel_futures=True)


class _SplitWriter:
  """Round-robin writer of one split's shards and their metadata, in a staging directory."""

  def __init__(self, directory: str, split: str, num_shards: int, options: str,
               cine_shards: bool, layout: str):
    self.split = split
    self.layout = layout
    self.paths = [os.path.join(directory, SHARD_PATTERN.format(split=split, index=i,
                                                               count=num_shards))
                  for i in range(num_shards)]
    self._cine_paths = [os.path.join(directory, CINE_SHARD_PATTERN.format(
        split=split, index=i, count=num_shards)) for i in range(num_shards)] if cine_shards else []
    self._options = options
    self._writers: list[Any] = [None] * num_shards
    self._cine_writers: list[Any] = [None] * len(self._cine_paths)
    self.metadata: list[list[dict[str, Any]]] = [[] for _ in range(num_shards)]

  def write(self, record: types.StudyRecord) -> None:
    shard = sum(len(m) for m in self.metadata) % len(self.paths)
    if self._writers[shard] is None:
      self._writers[shard] = array_record_module.ArrayRecordWriter(self.paths[shard], self._options)
    cine_records = serialize_cine_records(record) if self._cine_paths else []
    # The "cines" layout keeps the header only here: its pixels are stored once, in the cine shard.
    self._writers[shard].write(cine_records[0] if self.layout == LAYOUT_CINES
                               else serialize_record(record))
    if cine_records:
      if self._cine_writers[shard] is None:
        self._cine_writers[shard] = array_record_module.ArrayRecordWriter(self._cine_paths[shard],
                                                                          self._options)
      for data in cine_records:
        self._cine_writers[shard].write(data)
    self.metadata[shard].append(record_metadata(record))

  def close(self, out_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Moves the non-empty shards to `out_dir`, writes the index; returns (info, index)."""
    used = [i for i, w in enumerate(self._writers) if w is not None]  # the first len(used)
    files, cine_files = [], []
    for rank, shard in enumerate(used):
      self._writers[shard].close()
      name = SHARD_PATTERN.format(split=self.split, index=rank, count=len(used))
      os.replace(self.paths[shard], os.path.join(out_dir, name))
      files.append(name)
      if self._cine_paths:
        self._cine_writers[shard].close()
        name = CINE_SHARD_PATTERN.format(split=self.split, index=rank, count=len(used))
        os.replace(self._cine_paths[shard], os.path.join(out_dir, name))
        cine_files.append(name)
    index = [m for shard in used for m in self.metadata[shard]]  # read order
    _write_json(os.path.join(out_dir, self.split + INDEX_SUFFIX), index)
    info = {"files": files, "shard_lengths": [len(self.metadata[s]) for s in used],
            "num_records": len(index), "layout": self.layout}
    if cine_files:
      info["cine_files"] = cine_files
    return info, index


def _write_json(path: str, value: Any) -> None:
  files.write_json(path, value, indent=1, allow_nan=False)


def label_stats(index: list[dict[str, Any]]) -> dict[str, Any]:
  """Count, mean and SD (ddof=1) of lvef, edv and esv over index entries that have them."""
  stats: dict[str, Any] = {}
  for key in ("lvef", "edv", "esv"):
    values = np.array([m[key] for m in index if m[key] is not None], np.float64)
    stats[key] = {"n": int(values.size),
                  "mean": float(values.mean()) if values.size else None,
                  "sd": float(values.std(ddof=1)) if values.size > 1 else None}
  return stats


def _remove_old_dataset(out_dir: str) -> None:
  """Removes a previous build's files from `out_dir` (only names this module writes)."""
  for name in os.listdir(out_dir):
    if ".array_record-" in name or name.endswith(INDEX_SUFFIX) or name == DATASET_INFO:
      os.remove(os.path.join(out_dir, name))


def build_dataset(items: collections.abc.Iterable[Any], out_dir: str, *,
                  cfg: preprocess.PreprocessConfig,
                  split_fn: Callable[[types.StudyRecord], str],
                  num_shards: int = 1, num_workers: int = 0,
                  writer_options: str = DEFAULT_WRITER_OPTIONS,
                  log_every_s: float = 10.0, cine_shards: bool = True,
                  pixels_twice: bool = False) -> BuildSummary:
  """Preprocesses studies in parallel and writes sharded ArrayRecord splits.

  Workers load and preprocess items (in item order, so the output is deterministic); this
  process assigns splits, drops duplicates and writes. A failing item is skipped with its name
  and reason and the build carries on. Files are staged and then moved into `out_dir`,
  replacing a previous build there.

  Args:
    items: `BuildItem`s, (name, loader) pairs or bare zero-argument loaders returning a `Study`;
      loaders must be picklable when num_workers > 0. Names appear in logs and in
      dataset_info.json: they must be pseudonyms.
    out_dir: dataset directory (created if needed).
    cfg: preprocessing config (recorded in dataset_info.json).
    split_fn: record -> split name (e.g. `splits.SubjectSplitter`).
    num_shards: shards per split (fewer when a split has fewer records).
    num_workers: worker processes; 0 builds in this process.
    writer_options: ArrayRecord writer options; keep group_size:1 for random access.
    log_every_s: seconds between progress log lines.
    cine_shards: write the per-cine shards (module docstring): pre-training then reads one cine
      per clip instead of the whole study. The pixels go there only (layout "cines"; the study
      shards hold the headers); False writes whole records only (layout "whole").
    pixels_twice: with cine_shards, also keep the whole records in the study shards (layout
      "whole", the pixels stored twice: how datasets were built before 2026-12).

  Returns:
    The summary; dataset_info.json holds the same plus per-split details.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if files.is_url(out_dir):
    raise ValueError(f"{out_dir}: datasets are built in a local folder; copy it to the bucket "
                     "afterwards (e.g. gcloud storage cp -r)")
  build_items = as_build_items(items)
  layout = LAYOUT_CINES if cine_shards and not pixels_twice else LAYOUT_WHOLE
  os.makedirs(out_dir, exist_ok=True)
  staging = os.path.join(out_dir, f".incomplete-{os.getpid()}")
  os.makedirs(staging, exist_ok=True)
  writers: dict[str, _SplitWriter] = {}
  first_of_checksum: dict[str, str] = {}
  skipped: list[dict[str, str]] = []
  duplicates: list[dict[str, str]] = []
  skipped_cines: list[str] = []
  start = last_log = time.monotonic()
  total = len(build_items)
  for done, built in enumerate(_built_in_order(build_items, cfg, num_workers), start=1):
    skipped_cines.extend(built.skipped_cines)
    record = built.record
    if record is None:
      skipped.append({"item": built.name, "reason": built.error})
      logging.warning("skipped %s: %s", built.name, built.error)
    elif record.checksum in first_of_checksum:
      duplicates.append({"item": built.name, "study_id": record.study_id,
                         "duplicate_of": first_of_checksum[record.checksum]})
      logging.warning("skipped %s: same pixels as %s", built.name,
                      first_of_checksum[record.checksum])
    else:
      try:
        split = str(split_fn(record))
      except Exception as e:  # a split rule failing on one record skips that record only
        skipped.append({"item": built.name, "reason": f"split: {type(e).__name__}: {e}"})
        logging.warning("skipped %s: %s", built.name, skipped[-1]["reason"])
      else:
        first_of_checksum[record.checksum] = record.study_id
        if split not in writers:
          writers[split] = _SplitWriter(staging, split, num_shards, writer_options,
                                        cine_shards, layout)
        writers[split].write(record)
    now = time.monotonic()
    if now - last_log >= log_every_s or done == total:
      rate = done / max(now - start, 1e-9)
      logging.info("built %d/%d items (%.2f/s, ETA %.0f s): %d written, %d skipped, "
                   "%d duplicates", done, total, rate, (total - done) / rate,
                   done - len(skipped) - len(duplicates), len(skipped), len(duplicates))
      last_log = now

  _remove_old_dataset(out_dir)
  splits_info, stats = {}, {}
  for split in sorted(writers):
    info, index = writers[split].close(out_dir)
    info["sites"] = dict(sorted(collections.Counter(m["site"] for m in index).items()))
    info["subjects"] = len({m["subject_id"] for m in index})
    info["labelled"] = sum(m["lvef"] is not None for m in index)
    splits_info[split] = info
    stats[split] = label_stats(index)
  shutil.rmtree(staging)
  elapsed = time.monotonic() - start
  _write_json(os.path.join(out_dir, DATASET_INFO), {
      "builder_version": BUILDER_VERSION,
      "record_format": RECORD_FORMAT,
      "preprocess": cfg.to_dict(),
      "writer_options": writer_options,
      "num_items": total,
      "splits": splits_info,
      "label_stats": stats,
      "skipped": skipped,
      "skipped_cines": skipped_cines,
      "duplicates": duplicates,
  })
  summary = BuildSummary(out_dir=out_dir, num_items=total,
                         counts={s: i["num_records"] for s, i in splits_info.items()},
                         skipped=skipped, duplicates=duplicates, skipped_cines=skipped_cines,
                         elapsed_s=elapsed)
  logging.info("built %s in %.1f s (%.2f items/s): %s; %d skipped, %d duplicates", out_dir,
               elapsed, summary.items_per_s, summary.counts, len(skipped), len(duplicates))
  return summary


def read_dataset_info(data_dir: str) -> dict[str, Any]:
  """Reads `dataset_info.json` of a dataset directory (a local folder or a URL)."""
  path = files.join(data_dir, DATASET_INFO)
  if not files.exists(path):
    raise FileNotFoundError(f"{path} not found: {data_dir} is not a built dataset")
  info = files.read_json(path)
  if isinstance(info.get("preprocess"), dict):
    info["preprocess"] = preprocess.with_legacy_defaults(info["preprocess"])
  return info


def split_layout(data_dir: str, split: str, split_info: dict[str, Any]) -> str:
  """A split's layout (`LAYOUTS`; "whole" when not recorded).

  Raises:
    ValueError: an unknown layout, or "cines" without per-cine shards, naming dataset_info.json.
  """
  layout = split_info.get("layout", LAYOUT_WHOLE)
  where = files.join(data_dir, DATASET_INFO)
  if layout not in LAYOUTS:
    raise ValueError(f"{where}: split {split!r} has layout {layout!r}, unknown to this reader "
                     f"(it reads {', '.join(LAYOUTS)}): update cmr_jax")
  if layout == LAYOUT_CINES and not split_info.get("cine_files"):
    raise ValueError(f"{where}: split {split!r} has layout {layout!r} but no cine_files")
  return layout


def load_index(data_dir: str, split: str) -> list[dict[str, Any]]:
  """Reads the per-record metadata of a split, in read order."""
  return files.read_json(files.join(data_dir, split + INDEX_SUFFIX))


@dataclasses.dataclass(frozen=True)
class StudyCines:
  """A study's fields and a reader of its cines one at a time.

  `record` is the whole record when read whole, else its header (frames [N, 0, 0, 0]): use
  `record.num_cines` and `cine(i)`, never `record.frames`.
  """

  record: types.StudyRecord
  read: Callable[[int], np.ndarray]  # cine i -> uint8 [T, S, S]

  def cine(self, i: int) -> np.ndarray:
    """Cine i's frames, uint8 [T, S, S]."""
    return self.read(i)


class StudySource(grain.sources.RandomAccessDataSource):
  """Random access to the decoded `StudyRecord`s of one split (grain-compatible, picklable).

  Attributes:
    metadata: per-record light metadata (`record_metadata`), in index order.
  """

  def __init__(self, data_dir: str, split: str):
    info = read_dataset_info(data_dir)
    if split not in info["splits"]:
      raise KeyError(f"split {split!r} not in {data_dir}; it has {sorted(info['splits'])}")
    split_info = info["splits"][split]
    self._split = split
    self._layout = split_layout(data_dir, split, split_info)
    self._paths = [files.join(data_dir, f) for f in split_info["files"]]
    self._starts = np.cumsum([0] + split_info["shard_lengths"])  # [num_shards + 1]
    # array_record opens local files only: shards at a URL are staged on this host first.
    self._source = grain.sources.ArrayRecordDataSource([files.local_copy(p) for p in self._paths])
    self.metadata = load_index(data_dir, split)
    if not len(self._source) == len(self.metadata) == self._starts[-1]:
      raise ValueError(f"split {split} of {data_dir}: shards hold {len(self._source)} records, "
                       f"the index {len(self.metadata)}, dataset_info {self._starts[-1]}")
    self._cine_paths = [files.join(data_dir, f) for f in split_info.get("cine_files", [])]
    self._cines = None
    if self._cine_paths:
      self._cines = grain.sources.ArrayRecordDataSource(
          [files.local_copy(p) for p in self._cine_paths])
      # The header of study i, then its cines: study i's header is record _headers[i].
      self._headers = np.cumsum([0] + [1 + len(m["views"]) for m in self.metadata])
      if len(self._cines) != self._headers[-1]:
        raise ValueError(f"split {split} of {data_dir}: cine shards hold {len(self._cines)} "
                         f"records, the index describes {self._headers[-1]}")

  def __len__(self) -> int:
    return len(self.metadata)

  def _where(self, index: int) -> str:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return (f"record {index} of split {self._split} ({self._paths[shard]}, position "
            f"{index - self._starts[shard]})")

  def __getitem__(self, index: int) -> types.StudyRecord:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for split {self._split} of {len(self)}")
    if self._layout == LAYOUT_CINES:  # the header and every cine, from the per-cine shards
      study = self.study_cines(index)
      return codec.assemble(study.record, [study.cine(i) for i in range(study.record.num_cines)])
    try:
      data = self._source[index]
    except Exception as e:  # array_record raises RuntimeError on hash mismatches and truncation
      raise CorruptRecordError(f"{self._where(index)}: unreadable: {e}") from e
    try:
      return deserialize_record(data)
    except CorruptRecordError as e:
      raise CorruptRecordError(f"{self._where(index)}: {e}") from e

  @property
  def layout(self) -> str:
    """Where the split's pixels are (`LAYOUTS`)."""
    return self._layout

  @property
  def has_cine_shards(self) -> bool:
    """Whether `study_cines` reads single cines (else it reads the whole record)."""
    return self._cines is not None

  def _read_cine_record(self, position: int, what: str) -> bytes:
    try:
      return self._cines[position]
    except Exception as e:  # array_record raises RuntimeError on hash mismatches and truncation
      raise CorruptRecordError(f"{what} of split {self._split} (cine shards {self._cine_paths}, "
                               f"record {position}): unreadable: {e}") from e

  def study_cines(self, index: int) -> StudyCines:
    """Study `index`'s fields and a reader of single cines: from the per-cine shards when the
    split has them (only the header and the cines read are touched), else the whole record."""
    index = int(index)
    if self._cines is None:
      record = self[index]
      return StudyCines(record, lambda i: record.frames[i])
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for split {self._split} of {len(self)}")
    start = int(self._headers[index])
    try:
      header = deserialize_record(self._read_cine_record(start, f"study {index}'s header"))
    except CorruptRecordError as e:
      raise CorruptRecordError(f"study {index} of split {self._split}: {e}") from e
    if header.num_cines != int(self._headers[index + 1]) - start - 1:
      raise CorruptRecordError(
          f"study {index} of split {self._split}: its header lists {header.num_cines} cines, "
          f"the index {len(self.metadata[index]['views'])}")

    def read(i: int) -> np.ndarray:
      if not 0 <= i < header.num_cines:
        raise IndexError(f"cine {i} out of range for study {index} of {header.num_cines} cines")
      what = f"cine {i} of study {index}"
      try:
        return deserialize_cine(self._read_cine_record(start + 1 + i, what))
      except CorruptRecordError as e:
        raise CorruptRecordError(f"{what} of split {self._split}: {e}") from e

    return StudyCines(header, read)

  def __repr__(self) -> str:
    return f"StudySource(split={self._split!r}, records={len(self)}, shards={len(self._paths)})"


def open_split(data_dir: str, split: str) -> StudySource:
  """Opens one split of a built dataset for random access (decoded `StudyRecord`s)."""
  return StudySource(data_dir, split)


def check_preprocess(data_dir: str, cfg: preprocess.PreprocessConfig) -> None:
  """Raises ValueError when a dataset's records were made with another preprocessing."""
  stored = read_dataset_info(data_dir)["preprocess"]
  wanted = cfg.to_dict()
  diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
  if diff:
    raise ValueError(
        f"{data_dir} was preprocessed differently from the model's training data ("
        + ", ".join(f"{k}: {stored.get(k)} vs model {wanted.get(k)}" for k in diff)
        + "): ingest the DICOM again with the model's settings (tools/ingest.py --like_model="
        "<the model's run folder>), or predict from the DICOM")
