"""Study records as bytes: the msgpack encoding of a `StudyRecord`, of its header and cines.

A whole record holds a study's fields and all its uint8 frames. The per-cine form
(`serialize_cine_records`) is the header, the record with frames [N, 0, 0, 0], then one record
per cine; `assemble` puts a header and its cines back together into the whole record.
Re-exported by `records`, which writes and reads them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import serialization
import numpy as np

from cmr_jax.data import types

RECORD_FORMAT = 1

_ARRAY_FIELDS = ("frames", "slice_index", "slice_position_mm", "source_spacing_mm")
_ARRAY_DTYPES = {"frames": np.uint8, "slice_index": np.int32, "slice_position_mm": np.float32,
                 "source_spacing_mm": np.float32}


class CorruptRecordError(ValueError):
  """A stored record could not be read or decoded."""


def serialize_record(record: types.StudyRecord) -> bytes:
  """Encodes a record as msgpack bytes (exact round trip with `deserialize_record`)."""
  fields = dataclasses.asdict(record)
  for name in _ARRAY_FIELDS:
    fields[name] = np.ascontiguousarray(fields[name], dtype=_ARRAY_DTYPES[name])
  fields["views"] = list(record.views)
  fields["record_format"] = RECORD_FORMAT
  return serialization.msgpack_serialize(fields)


def deserialize_record(data: bytes) -> types.StudyRecord:
  """Decodes `serialize_record` bytes; arrays are read-only views of `data`.

  Raises:
    CorruptRecordError: when the bytes are not a record of this format.
  """
  try:
    fields = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise CorruptRecordError(f"not a msgpack study record ({type(e).__name__}: {e})") from e
  if not isinstance(fields, dict) or fields.pop("record_format", None) != RECORD_FORMAT:
    raise CorruptRecordError(f"not a study record of format {RECORD_FORMAT}")
  fields["views"] = list(fields["views"])
  try:
    return types.StudyRecord(**fields)
  except TypeError as e:
    raise CorruptRecordError(f"study record fields do not match: {e}") from e


def serialize_cine_records(record: types.StudyRecord) -> list[bytes]:
  """A study as its per-cine shard records: the header (the record with frames [N, 0, 0, 0]),
  then each cine's uint8 [T, S, S] frames (msgpack)."""
  frames = np.ascontiguousarray(record.frames, dtype=np.uint8)
  header = dataclasses.replace(record, frames=np.zeros((len(frames), 0, 0, 0), np.uint8))
  return [serialize_record(header)] + [serialization.msgpack_serialize({"frames": cine})
                                       for cine in frames]


def deserialize_cine(data: bytes) -> np.ndarray:
  """Decodes one cine record of `serialize_cine_records`: uint8 [T, S, S], a read-only view.

  Raises:
    CorruptRecordError: when the bytes are not a cine record.
  """
  try:
    frames = serialization.msgpack_restore(data)["frames"]
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise CorruptRecordError(f"not a cine record ({type(e).__name__}: {e})") from e
  if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 3):
    raise CorruptRecordError("not a cine record (uint8 [T, S, S] frames)")
  return frames


def record_metadata(record: types.StudyRecord) -> dict[str, Any]:
  """The light per-record metadata kept in `{split}.index.json` (pseudonyms only)."""
  return {
      "study_id": record.study_id,
      "subject_id": record.subject_id,
      "site": record.site,
      "visit": record.visit,
      "lvef": None if math.isnan(record.lvef) else record.lvef,
      "edv": None if math.isnan(record.edv) else record.edv,
      "esv": None if math.isnan(record.esv) else record.esv,
      "has_report": bool(record.report.strip()),
      "views": list(record.views),
      "slice_index": [int(i) for i in record.slice_index],
      "checksum": record.checksum,
  }


def assemble(header: types.StudyRecord, cines: list[np.ndarray]) -> types.StudyRecord:
  """The whole record of a header (frames [N, 0, 0, 0]) and its N cines, in order: equal to the
  record `serialize_cine_records` split; its frames are read-only, like a decoded record's."""
  if len(cines) != header.num_cines or not cines:
    raise CorruptRecordError(f"study {header.study_id}: its header lists {header.num_cines} "
                             f"cines, {len(cines)} were read")
  frames = np.stack(cines)
  frames.flags.writeable = False
  return dataclasses.replace(header, frames=frames)
