r"""Reads a split of our records directly and through tensorflow-datasets, side by side.

  pip install tensorflow-datasets       # no longer a dependency of cmr_jax (README, "TFDS")
  python tools/bench_tfds.py --data_dir=/tmp/bench_ingest/new --split=train

Writes the split's records into a TFDS dataset (a `GeneratorBasedBuilder` in ArrayRecord format,
the layout `tfds.data_source` opens; pixels as one bytes feature, the cheapest TFDS encoding, or
with --encoding=none TFDS's default) under --workdir, then times random-access reads of every
record, alternating the two readers for --rounds: `records.open_split(...)[i]` (array_record +
msgpack decode) and `tfds.data_source(name, data_dir=...)[i]` (array_record + TFDS feature
decoding). Prints records/s of each, their ratio, and one JSON line.
"""

import json
import shutil
import statistics
import time

from absl import flags
import numpy as np

from cmr_jax import logs
from cmr_jax.data import records

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A records dataset (tools/ingest.py output).",
                                required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_tfds", "Where the TFDS copy is written.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed passes over the split, per reader.")
_ENCODING = flags.DEFINE_enum("encoding", "bytes", ["bytes", "none"],
                              "TFDS encoding of the pixel tensor (none: TFDS's default).")


def _builder(tfds, source: records.StudySource, encoding: str):
  """A TFDS builder whose examples are the split's records (frames, views, ids, labels)."""
  tensor_encoding = (tfds.features.Encoding.BYTES if encoding == "bytes"
                     else tfds.features.Encoding.NONE)
  split = _SPLIT.value
  frame_shape = tuple(source[0].frames.shape[1:])  # (frames, size, size): the same in every record

  class CmrRecords(tfds.core.GeneratorBasedBuilder):  # pylint: disable=abstract-method
    """The split's study records as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "frames": tfds.features.Tensor(shape=(None,) + frame_shape, dtype=np.uint8,
                                         encoding=tensor_encoding),
          "slice_index": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "views": tfds.features.Sequence(tfds.features.Text()),
          "study_id": tfds.features.Text(),
          "lvef": np.float32}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(source)):
        r = source[i]
        yield i, {"frames": np.asarray(r.frames), "slice_index": np.asarray(r.slice_index),
                  "views": list(r.views), "study_id": r.study_id, "lvef": np.float32(r.lvef)}

  return CmrRecords


def _rate(read, count: int) -> float:
  start = time.perf_counter()
  for i in np.random.default_rng(0).permutation(count):
    read(int(i))
  return count / (time.perf_counter() - start)


def main() -> None:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = records.open_split(_DATA_DIR.value, _SPLIT.value)
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  builder = _builder(tfds, source, _ENCODING.value)(data_dir=_WORKDIR.value,
                                                    file_format="array_record")
  start = time.perf_counter()
  builder.download_and_prepare()
  write_s = time.perf_counter() - start
  tfds_source = tfds.data_source(builder.name, split=_SPLIT.value, data_dir=_WORKDIR.value)
  first = tfds_source[0]  # TFDS orders examples by a hash of their keys
  study_id = first["study_id"].decode() if isinstance(first["study_id"], bytes) else str(
      first["study_id"])
  same = [i for i, m in enumerate(source.metadata) if m["study_id"] == study_id]
  assert same and np.array_equal(first["frames"], source[same[0]].frames), "TFDS copy differs"
  rates: dict[str, list[float]] = {"direct": [], "tfds": []}
  for _ in range(_ROUNDS.value):
    rates["direct"].append(_rate(source.__getitem__, len(source)))
    rates["tfds"].append(_rate(tfds_source.__getitem__, len(source)))
  result = {"records": len(source), "record_mb": round(np.asarray(first["frames"]).nbytes / 1e6, 2),
            "encoding": _ENCODING.value, "tfds_write_records_per_s": round(len(source) / write_s, 2),
            **{f"{k}_records_per_s": round(statistics.median(v), 1) for k, v in rates.items()},
            "rounds": _ROUNDS.value, "tfds_version": tfds.__version__,
            "tensorflow": "tensorflow" in __import__("sys").modules}
  result["direct_over_tfds"] = round(result["direct_records_per_s"]
                                     / result["tfds_records_per_s"], 1)
  print(f"direct {result['direct_records_per_s']} records/s, tfds.data_source "
        f"{result['tfds_records_per_s']} records/s ({result['direct_over_tfds']}x slower), "
        f"{result['records']} records of {result['record_mb']} MB")
  print(json.dumps(result))


if __name__ == "__main__":
  logs.run(main)
