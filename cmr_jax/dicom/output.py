"""The output folder of an ingest run: checked before anything in it is removed or written.

`ingest.run_ingest` checks its inputs and its output first (`check_input`, `check_output`,
`read_parts`, then discovery), so a mistyped path, another salt or an unrelated folder ends the
run with one line (`UsageProblem`) and leaves the output as it was:

- the input must exist and be a folder or a zip (any regular file with the generic layout),
  neither inside the output nor holding it; the labels and reports CSVs must exist, and the
  private path key must lie outside the output, in an existing folder;
- the output must be new, empty, or an earlier ingest's output (`parts/` or
  `dataset_info.json`); another non-empty folder is refused unless --overwrite, and --overwrite
  removes only the names an ingest writes (`parts/`, `*.index.json`, `dataset_info.json`,
  `manifest.csv`, ArrayRecord shards), never other files;
- resuming needs the salt of the earlier runs: each part records `salt_fingerprint(salt)`, a
  keyed hash (HMAC-SHA256) of a fixed text under the salt, never the salt itself;
- each part records, per study, `inputs_fingerprint` of its files (path relative to the input,
  size, modification time; keyed, so no path is written): a resumed study whose files changed
  is converted again together with the other studies of its part (the unit of resumption), and
  the part's old records are removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import layouts
from cmr_jax.dicom import pseudonym

MANIFEST = "manifest.csv"
PARTS = "parts"
PART_NAME = "part-{index:05d}"
DONE_SUFFIX = ".done.json"
MANIFEST_SUFFIX = ".manifest.csv"
SALT_KIND = "salt"
INPUTS_KIND = "inp"
_SALT_TEXT = "cmr-jax ingest output"
# What an ingest writes below parts/ (and what a crash may leave there).
_PART_ENTRY = re.compile(r"(part-\d{5,})(\.done\.json|\.manifest\.csv)?(\.tmp)?")
_SHARD = re.compile(r".+\.array_record-\d{5,}-of-\d{5,}")


class UsageProblem(ValueError):
  """A problem with the options of an ingest run (paths, salt, output folder): one line, found
  before anything in the output was removed or written."""


@dataclasses.dataclass(frozen=True)
class Part:
  """A finished part: its index, study pseudonyms and their inputs fingerprints."""

  index: int
  studies: list[str]
  inputs: dict[str, str]


def salt_fingerprint(salt: str) -> str:
  """A keyed hash telling whether two runs used the same salt (not the salt, nor reversible)."""
  return pseudonym.pseudonym(salt, SALT_KIND, _SALT_TEXT)


def inputs_fingerprint(spec: layouts.StudySpec, root: str, salt: str) -> str:
  """A keyed hash of a study's files: relative path, size and modification time of each (zip
  members: of their zip). Changes when a file is added, removed, rewritten or replaced."""
  lines = []
  stats: dict[str, str] = {}
  for ref in sorted(spec.files):
    if ref.path not in stats:
      try:
        st = os.stat(ref.path)
        stats[ref.path] = f"{st.st_size}\t{st.st_mtime_ns}"
      except OSError as e:  # gone or unreadable since discovery: reading will say so
        stats[ref.path] = type(e).__name__
    lines.append(f"{ref.relative(root)}\t{stats[ref.path]}")
  return pseudonym.pseudonym(salt, INPUTS_KIND, "\n".join(lines))


def part_dir(output: str, index: int) -> str:
  return os.path.join(output, PARTS, PART_NAME.format(index=index))


def write_json(path: str, value) -> None:
  """Writes JSON atomically (a temporary file renamed over `path`)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, allow_nan=False)
  os.replace(tmp, path)


def check_input(layout: str, input_path: str, *, labels: str, reports: str, path_key: str,
                output: str) -> None:
  """Raises UsageProblem unless the input and the CSVs exist and the path key is outside."""
  shown = dicom_files.printable(input_path)
  if not os.path.exists(input_path):
    raise UsageProblem(f"--input {shown} does not exist")
  if not os.path.isdir(input_path):
    if not os.path.isfile(input_path):
      raise UsageProblem(f"--input {shown} is neither a folder nor a file")
    if layout != layouts.GENERIC and not dicom_files.is_zip(input_path):
      raise UsageProblem(f"--input {shown} is a file: --layout={layout} reads a folder or a zip")
  real_in, real_out = os.path.realpath(input_path), os.path.realpath(output)
  if os.path.commonpath([real_in, real_out]) in (real_in, real_out):
    raise UsageProblem(f"--input {shown} and --output {dicom_files.printable(output)} lie one "
                       "inside the other: the output would be read as input, or removed")
  for flag, value in (("labels", labels), ("reports", reports)):
    for path in (value.split(",") if flag == "labels" and layout == layouts.KAGGLE else [value]):
      if path and not os.path.isfile(path):
        raise UsageProblem(f"--{flag} {dicom_files.printable(path)} is not a file")
  if path_key and os.path.abspath(path_key).startswith(os.path.abspath(output) + os.sep):
    raise UsageProblem("--path_key holds identifying input paths: write it outside --output")
  if path_key and not os.path.isdir(os.path.dirname(os.path.abspath(path_key))):
    raise UsageProblem(f"--path_key {dicom_files.printable(path_key)}: its folder does not exist")


def check_output(output: str, *, overwrite: bool) -> bool:
  """Raises UsageProblem for an output that may not be written; True when there is an earlier
  ingest's output to resume (or, with `overwrite`, to replace)."""
  shown = dicom_files.printable(output)
  if not os.path.exists(output):
    return False
  if not os.path.isdir(output):
    raise UsageProblem(f"--output {shown} exists and is not a folder")
  if not os.listdir(output):
    return False
  parts = os.path.join(output, PARTS)
  has_parts = os.path.isdir(parts)
  if has_parts and not all(_PART_ENTRY.fullmatch(name) for name in os.listdir(parts)):
    raise UsageProblem(f"--output {shown} has a folder {PARTS}/ that tools/ingest.py did not "
                       "write: choose a new or empty folder")
  ours = has_parts or os.path.isfile(os.path.join(output, records.DATASET_INFO))
  if not ours and not overwrite:
    raise UsageProblem(
        f"--output {shown} is not empty and holds no dataset of tools/ingest.py (no "
        f"{records.DATASET_INFO} or {PARTS}/): choose a new or empty folder (--overwrite "
        "writes into it, removing only files named as an ingest's)")
  if ours and not has_parts and not overwrite:
    raise UsageProblem(f"--output {shown} holds a dataset not written by tools/ingest.py (no "
                       f"{PARTS}/): use --overwrite to replace it, or another --output")
  return ours


def read_parts(output: str, cfg: preprocess.PreprocessConfig, salt: str,
               split_rule: dict[str, Any] | None = None) -> list[Part]:
  """The finished parts of an output; removes nothing.

  Raises:
    UsageProblem: parts made with another preprocessing config, another salt or (when given and
      recorded) another split rule (`ingest.split_rule`), or by a version that recorded no
      fingerprints.
  """
  parts_dir = os.path.join(output, PARTS)
  if not os.path.isdir(parts_dir):
    return []
  shown = dicom_files.printable(output)
  finished = []
  for name in sorted(os.listdir(parts_dir)):
    if not name.endswith(DONE_SUFFIX):
      continue
    with open(os.path.join(parts_dir, name)) as f:
      done = json.load(f)
    if preprocess.with_legacy_defaults(done["preprocess"]) != cfg.to_dict():
      raise UsageProblem(
          f"{shown} holds records made with another preprocessing config ({done['preprocess']})"
          "; use a new --output, the same config, or --overwrite")
    if "salt" not in done or "inputs" not in done:
      raise UsageProblem(
          f"{shown} was written by an earlier tools/ingest.py that recorded no salt and input "
          "fingerprints: use --overwrite to rebuild it, or another --output")
    if done["salt"] != salt_fingerprint(salt):
      raise UsageProblem(
          f"{shown} was ingested with another salt (resuming would ingest its studies again "
          "under new pseudonyms): give the earlier salt, or use --overwrite or another --output")
    if split_rule is not None and done.get("split_rule", split_rule) != split_rule:
      raise UsageProblem(
          f"{shown} was ingested with other splits ({done['split_rule']}; now {split_rule}): "
          "resuming would put studies of one dataset into splits by two rules; give the earlier "
          "--fractions/--external, or use --overwrite or another --output")
    finished.append(Part(done["index"], done["studies"], done["inputs"]))
  return finished


def stale_parts(finished: Sequence[Part], fingerprints: dict[str, str]) -> list[Part]:
  """The parts holding a study whose input files changed (`fingerprints`: the input's now)."""
  return [p for p in finished
          if any(s in fingerprints and p.inputs.get(s) != fingerprints[s] for s in p.studies)]


def remove_parts(output: str, keep: Sequence[int]) -> None:
  """Removes every part but the finished ones in `keep` (interrupted or stale parts)."""
  parts_dir = os.path.join(output, PARTS)
  keep_names = {PART_NAME.format(index=i) for i in keep}
  for name in os.listdir(parts_dir):
    match = _PART_ENTRY.fullmatch(name)
    if not match or (match.group(1) in keep_names and not match.group(3)):
      continue
    path = os.path.join(parts_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def clear(output: str) -> None:
  """Removes what an ingest writes into `output` (and nothing else)."""
  if os.path.isdir(os.path.join(output, PARTS)):
    shutil.rmtree(os.path.join(output, PARTS))
  for name in os.listdir(output):
    path = os.path.join(output, name)
    if os.path.isfile(path) and (name.endswith(records.INDEX_SUFFIX) or _SHARD.fullmatch(name)
                                 or name in (records.DATASET_INFO, MANIFEST)):
      os.remove(path)


def prepare_rebuild(output: str, *, overwrite: bool) -> None:
  """For a run that cannot resume (the Beam engine): refuses an earlier ingest's output unless
  `overwrite`, which clears it (`clear`)."""
  if check_output(output, overwrite=overwrite) and not overwrite:
    raise UsageProblem(f"--output {dicom_files.printable(output)} holds an earlier ingest's "
                       "output and --engine=beam does not resume: use --overwrite or another "
                       "--output")
  if overwrite and os.path.isdir(output):
    clear(output)
