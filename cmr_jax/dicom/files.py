"""Finding and reading the input files: regular files below a folder and the members of zips.

`list_input_files` walks an input (a folder, a zip, or one file) into `FileRef`s in a
deterministic order, with the entries it does not read and why; `iter_file_bytes` reads them,
opening each zip archive once. Hostile or unusual entries cost one manifest row each, never the
run:

- Only regular files are read: FIFOs, devices and sockets are reported (a FIFO would block the
  read forever, /dev/zero never ends), also when found between listing and reading.
- Symbolic links below the input are not followed (the input itself may be one): a link to a
  target inside the input is read by that target's own path, a link outside would read files
  the user did not give. Each link is reported with its reason; no cycle can form.
- `ReadLimits` caps what one file may make the reader read and allocate; a file over a limit is
  refused before it is read (its size) or decoded (its header's claims, see `parse`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import stat
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

ZIP_SUFFIX = ".zip"
MIB = 1 << 20
MIN_ELEMENT_BYTES = 8  # the smallest data element or sequence item: tag and length
# What reading a zip archive or one of its members may raise (corrupt, encrypted, unsupported).
ZIP_ERRORS = (OSError, EOFError, KeyError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
              zlib.error)
_FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
               (stat.S_ISDIR, "folder"))
LINK_INSIDE = "symbolic link (not followed: its target inside the input is read by its own path)"
LINK_OUTSIDE = "symbolic link to a target outside the input (not followed)"
LINK_BROKEN = "broken symbolic link"


class RefusedFile(OSError):
  """A file not read: not a regular file, or over a `ReadLimits` limit. The message is the
  manifest reason; it holds no path."""


@dataclasses.dataclass(frozen=True)
class ReadLimits:
  """Caps on what one input file may make the reader read and allocate.

  Each is checked before the reading or allocating it guards, against the file's size or its
  header's claims; a file over a limit is skipped with a reason naming the limit and its flag
  (the same names in tools/ingest.py and tools/predict.py).

  Attributes:
    max_file_bytes: bytes read from one file or zip member (a DICOM file is read whole).
    max_frame_pixels: Rows x Columns of one frame.
    max_frames_per_file: NumberOfFrames of one file.
    max_pixel_bytes: decoded pixel data of one file (rows x columns x samples x bits x frames).
    max_element_reads: reads while parsing one file's data elements: one to three per element
      (tag, long length, value) or sequence item, so at least a third as many elements; each
      costs time and memory whatever its size (millions of empty ones fit in a few megabytes).
  """

  max_file_bytes: int = 512 * MIB
  max_frame_pixels: int = 1024 * 1024
  max_frames_per_file: int = 4096
  max_pixel_bytes: int = 256 * MIB
  max_element_reads: int = 1_000_000

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"--{field.name} must be a positive integer, got {value!r}")

  def file_problem(self, size: int, *, at_least: bool = False) -> str:
    """Why a file of `size` bytes (or more, with `at_least`) is not read; "" when it may be."""
    if size <= self.max_file_bytes and not at_least:
      return ""
    return (f"{'more than ' if at_least else ''}{size} bytes, over the limit of "
            f"{self.max_file_bytes} bytes per file (--max_file_bytes)")

  def element_reads_problem(self) -> str:
    """Why a file is not parsed further: its data elements take too many reads."""
    return (f"more than {self.max_element_reads} reads of data elements (tags, lengths, "
            "values), over the limit per file (--max_element_reads)")

  def header_problem(self, header_bytes: int) -> str:
    """Why a file's header (all but its pixel data) is not parsed further: its sequences,
    parsed when used, could hold more data elements than `max_element_reads`."""
    if header_bytes <= MIN_ELEMENT_BYTES * self.max_element_reads:
      return ""
    return (f"header of {header_bytes} bytes could hold more than {self.max_element_reads} "
            "data elements, over the limit per file (--max_element_reads)")

  def pixels_problem(self, rows: int, columns: int, frames: int, pixel_bytes: int) -> str:
    """Why a file whose header claims these dimensions is not decoded; "" when it may be."""
    if rows * columns > self.max_frame_pixels:
      return (f"header claims {rows}x{columns} pixels per frame, over the limit of "
              f"{self.max_frame_pixels} pixels (--max_frame_pixels)")
    if frames > self.max_frames_per_file:
      return (f"header claims {frames} frames, over the limit of {self.max_frames_per_file} "
              "frames per file (--max_frames_per_file)")
    if pixel_bytes > self.max_pixel_bytes:
      return (f"header claims {pixel_bytes} bytes of pixel data, over the limit of "
              f"{self.max_pixel_bytes} bytes per file (--max_pixel_bytes)")
    return ""


@dataclasses.dataclass(frozen=True, order=True)
class FileRef:
  """One input entry: a file on disk, a member of a zip archive on disk, or (reported only) a
  link or special file."""

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


def printable(text: str) -> str:
  """`text` safe to print and write as UTF-8: bytes of a file name that are not UTF-8 (held by
  Python as surrogate escapes) become `\\xNN`."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_regular(mode: int) -> str:
  """The skip reason for an entry of this kind that is not a regular file."""
  kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
  return f"not a regular file ({kind})"


def _link_problem(path: str, real_root: str) -> str:
  """The skip reason for a symbolic link below the input."""
  if not os.path.exists(path):
    return LINK_BROKEN
  target = os.path.realpath(path)
  inside = os.path.commonpath([target, real_root]) == real_root
  return LINK_INSIDE if inside else LINK_OUTSIDE


def _walk(root: str) -> tuple[list[str], list[tuple[str, str]]]:
  """The regular files below a folder (per folder sorted by name, folders depth first in name
  order) and (path, reason) for every entry below it that is not read."""
  real_root = os.path.realpath(root)
  paths, skipped = [], []
  folders = [root]
  while folders:
    folder = folders.pop()
    try:
      with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      skipped.append((folder, f"unreadable folder ({type(e).__name__})"))
      continue
    subfolders = []
    for entry in entries:
      try:
        if entry.is_symlink():
          skipped.append((entry.path, _link_problem(entry.path, real_root)))
        elif entry.is_dir(follow_symlinks=False):
          subfolders.append(entry.path)
        elif entry.is_file(follow_symlinks=False):
          paths.append(entry.path)
        else:
          skipped.append((entry.path, _not_regular(entry.stat(follow_symlinks=False).st_mode)))
      except OSError as e:
        skipped.append((entry.path, f"unreadable entry ({type(e).__name__})"))
    folders.extend(reversed(subfolders))
  return paths, skipped


def list_input_files(root: str) -> tuple[list[FileRef], list[tuple[FileRef, str]]]:
  """Lists every file below `root` (a folder, a zip, or one file), zips expanded into members.

  Returns:
    (files, problems): the files in a deterministic order, and (entry, reason) for each entry
    not read: zip archives that could not be opened, links, special files, unreadable folders
    (each counts as one skipped input file).
  """
  if os.path.isdir(root):
    paths, skipped = _walk(root)
  else:
    mode = os.stat(root).st_mode if os.path.exists(root) else stat.S_IFREG  # read: reported
    paths, skipped = ([root], []) if stat.S_ISREG(mode) else ([], [(root, _not_regular(mode))])
  files, problems = [], [(FileRef(p), reason) for p, reason in skipped]
  for path in paths:
    if not is_zip(path):
      files.append(FileRef(path))
      continue
    try:
      with open_zip(path) as zf:
        files.extend(FileRef(path, m) for m in sorted(zf.namelist()) if not m.endswith("/"))
    except RefusedFile as e:
      problems.append((FileRef(path), str(e)))
    except ZIP_ERRORS as e:
      problems.append((FileRef(path), f"unreadable zip archive ({type(e).__name__})"))
  return files, problems


def _open_nonblocking(path: str, flags: int) -> int:
  """`open`'s opener: opening a FIFO (swapped in after `os.stat`) must not wait for a writer."""
  return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path: str, limits: ReadLimits | None = None) -> BinaryIO:
  """Opens a regular file for reading (a FIFO, device or socket is refused, without blocking
  or opening it); with `limits`, a file over `max_file_bytes` is refused too.

  Raises:
    RefusedFile: for those; OSError when the file cannot be opened.
  """
  mode = os.stat(path).st_mode  # refused before opening: opening a device may act on it
  if not stat.S_ISREG(mode):
    raise RefusedFile(_not_regular(mode))
  f = open(path, "rb", opener=_open_nonblocking)  # pylint: disable=consider-using-with
  try:
    info = os.fstat(f.fileno())  # the file opened, should it have been replaced since `os.stat`
    problem = (_not_regular(info.st_mode) if not stat.S_ISREG(info.st_mode)
               else limits.file_problem(info.st_size) if limits else "")
    if problem:
      raise RefusedFile(problem)
    return f
  except BaseException:
    f.close()
    raise


@contextlib.contextmanager
def open_zip(path: str) -> Iterator[zipfile.ZipFile]:
  """A zip archive on disk, opened only if it is a regular file (see `open_regular`)."""
  with open_regular(path) as f, zipfile.ZipFile(f) as zf:
    yield zf


def _read_at_most(f: BinaryIO, limits: ReadLimits) -> bytes:
  """All of `f`, refused when it holds more than `max_file_bytes` whatever its size claimed."""
  data = f.read(limits.max_file_bytes + 1)
  if len(data) > limits.max_file_bytes:
    raise RefusedFile(limits.file_problem(limits.max_file_bytes, at_least=True))
  return data


@contextlib.contextmanager
def open_member(zf: zipfile.ZipFile, member: str, limits: ReadLimits) -> Iterator[BinaryIO]:
  """A zip member as a stream, refused when its stated size is over `max_file_bytes` (a first
  check: the stream never yields more than the stated size, see `zipfile.ZipExtFile`)."""
  info = zf.getinfo(member)
  problem = limits.file_problem(info.file_size)
  if problem:
    raise RefusedFile(problem)
  with zf.open(info) as f:
    yield f


def read_member(zf: zipfile.ZipFile, member: str, limits: ReadLimits) -> bytes:
  """A zip member's bytes, at most `max_file_bytes` of them (else `RefusedFile`)."""
  with open_member(zf, member, limits) as f:
    return _read_at_most(f, limits)


def read_file(path: str, limits: ReadLimits) -> bytes:
  """A regular file's bytes, at most `max_file_bytes` of them (else `RefusedFile`)."""
  with open_regular(path, limits) as f:
    return _read_at_most(f, limits)


def iter_file_bytes(refs: Iterable[FileRef], limits: ReadLimits = ReadLimits()
                    ) -> Iterator[tuple[FileRef, bytes | Exception]]:
  """Yields (file, its bytes or the exception raised reading it), opening each zip once."""
  for path, group in itertools.groupby(refs, key=lambda r: r.path):
    group = list(group)
    if not group[0].member:
      for ref in group:
        try:
          yield ref, read_file(ref.path, limits)
        except OSError as e:
          yield ref, e
      continue
    with contextlib.ExitStack() as stack:
      try:
        zf = stack.enter_context(open_zip(path))
      except ZIP_ERRORS as e:
        for ref in group:
          yield ref, e
        continue
      for ref in group:
        try:
          yield ref, read_member(zf, ref.member, limits)
        except ZIP_ERRORS as e:
          yield ref, e
