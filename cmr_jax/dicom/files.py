"""Finding the input files: plain files below a folder and the members of zip archives.

`list_input_files` walks an input (a folder, a zip, or one file) into `FileRef`s in a
deterministic order; `iter_file_bytes` reads them, opening each zip archive once.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zipfile
from collections.abc import Iterable, Iterator

ZIP_SUFFIX = ".zip"


@dataclasses.dataclass(frozen=True, order=True)
class FileRef:
  """One input file: a file on disk, or a member of a zip archive on disk."""

  path: str  # the file, or the zip archive holding it
  member: str = ""  # member name inside the zip; "" for a plain file

  def relative(self, root: str) -> str:
    """The file's path relative to the input root (zip members as `<zip>/<member>`)."""
    rel = os.path.relpath(self.path, root) if os.path.isdir(root) else os.path.basename(self.path)
    return f"{rel}/{self.member}" if self.member else rel

  @property
  def folder(self) -> str:
    """Name of the folder holding the file (inside the zip for members)."""
    return os.path.basename(os.path.dirname(self.member or self.path))


def is_zip(path: str) -> bool:
  """True for a path named like a zip archive."""
  return path.lower().endswith(ZIP_SUFFIX)


def list_input_files(root: str) -> tuple[list[FileRef], list[tuple[FileRef, str]]]:
  """Lists every file below `root` (a folder, a zip, or one file), zips expanded into members.

  Returns:
    (files, problems): the files in a deterministic order, and (file, reason) for zip archives
    that could not be opened (each counts as one skipped input file).
  """
  if os.path.isdir(root):
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      paths.extend(os.path.join(dirpath, f) for f in sorted(filenames))
  else:
    paths = [root]
  files, problems = [], []
  for path in paths:
    if not is_zip(path):
      files.append(FileRef(path))
      continue
    try:
      with zipfile.ZipFile(path) as zf:
        files.extend(FileRef(path, m) for m in sorted(zf.namelist()) if not m.endswith("/"))
    except (zipfile.BadZipFile, OSError) as e:
      problems.append((FileRef(path), f"unreadable zip archive ({type(e).__name__})"))
  return files, problems


def iter_file_bytes(refs: Iterable[FileRef]) -> Iterator[tuple[FileRef, bytes | Exception]]:
  """Yields (file, its bytes or the exception raised reading it), opening each zip once."""
  for path, group in itertools.groupby(refs, key=lambda r: r.path):
    group = list(group)
    if not group[0].member:
      for ref in group:
        try:
          with open(ref.path, "rb") as f:
            yield ref, f.read()
        except OSError as e:
          yield ref, e
      continue
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      for ref in group:
        yield ref, e
      continue
    with zf:
      for ref in group:
        try:
          yield ref, zf.read(ref.member)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
          yield ref, e

