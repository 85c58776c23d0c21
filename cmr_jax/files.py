"""Run, data and weight folders on local disk or object storage: the one file layer.

Every path a run, a dataset or a weight folder is read from or written to goes through here, so
`--workdir=gs://bucket/run` and `--config.data.dir=gs://bucket/data` work without a FUSE mount.
Local paths go through `os` and `open` exactly as before (the same bytes on disk); URLs
(gs://, s3://, az://) through `etils.epath` (gcsfs for gs://, s3fs for s3://). A string with an
unknown scheme (e.g. `memory://x`) is refused rather than written to a local `./memory:/x`.

Object stores have no rename and no append: `write_text`/`write_json` are atomic there because
one object write is (locally they write a temporary file and rename it). ArrayRecord shards
cannot be read from a URL by array_record itself, so `local_copy` stages them into a per-host
cache folder (`CACHE_ENV`).
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import posixpath
import re
import shutil
from typing import Any, IO

from absl import logging

# Schemes etils.epath serves, with the package each needs.
URL_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The folder remote ArrayRecord shards are staged in (default: ~/.cache/cmr_jax/shards).
CACHE_ENV = "CMR_JAX_CACHE_DIR"
_COPY_CHUNK = 16 << 20


def is_url(path: str) -> bool:
  """Whether `path` is a URL (scheme://...) rather than a local path."""
  return _URL.match(os.fspath(path)) is not None


def _epath(path: str):
  """`path` as an etils.epath.Path, with a one-line error for an unknown scheme or a missing
  backend package."""
  scheme = _URL.match(path).group(1)
  if scheme not in URL_SCHEMES:
    raise ValueError(f"{path}: unsupported URL scheme {scheme}://; use a local path or one of "
                     f"{', '.join(s + '://' for s in URL_SCHEMES)}")
  package = URL_SCHEMES[scheme]
  if importlib.util.find_spec(package) is None:
    raise ImportError(f"{path}: {scheme}:// paths need the {package} package "
                      f"(pip install {package})")
  _no_listing_cache()
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _no_listing_cache() -> None:
  """Makes gcsfs list afresh: its default keeps a folder's listing forever, blind to what other
  hosts and orbax's tensorstore write (a new checkpoint step would stay unseen). fsspec applies
  this to every gs:// filesystem made after it, orbax's included."""
  import fsspec  # pylint: disable=g-import-not-at-top
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def join(path: str, *parts: str) -> str:
  """`os.path.join` for local paths; '/'-joined for URLs."""
  if is_url(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def abspath(path: str) -> str:
  """The absolute local path, or the URL unchanged."""
  return path if is_url(path) else os.path.abspath(path)


def dirname(path: str) -> str:
  """The folder of `path` (a URL keeps its scheme)."""
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a folder (for a URL: a prefix with objects under it)."""
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def getsize(path: str) -> int:
  return _epath(path).stat().length if is_url(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
  """Creates a folder and its parents (a no-op where it exists; on object stores a marker at
  most)."""
  if is_url(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in a folder."""
  if is_url(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def remove(path: str) -> None:
  if is_url(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  if is_url(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(path)


def open_file(path: str, mode: str = "r", **kwargs: Any) -> IO[Any]:
  """`open` for local paths and URLs (no append on URLs: object stores cannot)."""
  if not is_url(path):
    return builtins.open(path, mode, **kwargs)
  if "a" in mode or "+" in mode:
    raise ValueError(f"{path}: mode {mode!r} is not available on object storage")
  return _epath(path).open(mode, **kwargs)


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def read_json(path: str) -> Any:
  with open_file(path) as f:
    return json.load(f)


def write_text(path: str, text: str, **open_kwargs: Any) -> None:
  """Writes `text` atomically: readers see the old file or the new one, never a part."""
  if is_url(path):
    with open_file(path, "w", **open_kwargs) as f:  # one object write is atomic
      f.write(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with builtins.open(tmp, "w", **open_kwargs) as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value: Any, **dump_kwargs: Any) -> None:
  """`json.dump(value, **dump_kwargs)` written atomically (`write_text`)."""
  write_text(path, json.dumps(value, **dump_kwargs))


def copy(src: str, dst: str) -> None:
  """Copies one file between any two places (local or URL)."""
  if not is_url(src) and not is_url(dst):
    shutil.copyfile(src, dst)
    return
  with open_file(src, "rb") as fin, open_file(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def copy_tree(src: str, dst: str) -> None:
  """Copies the files under the local folder `src` to the folder (or URL) `dst`."""
  for folder, _, names in os.walk(src):
    rel = os.path.relpath(folder, src)
    target = dst if rel == "." else join(dst, *rel.split(os.sep))
    makedirs(target)
    for name in names:
      copy(os.path.join(folder, name), join(target, name))


def cache_dir() -> str:
  """This host's folder for staged remote files: $CMR_JAX_CACHE_DIR or ~/.cache/cmr_jax/shards."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cmr_jax",
                                                   "shards")


def local_copy(path: str) -> str:
  """A local path with the contents of `path`: `path` itself when local; for a URL, a copy in
  `cache_dir()` (downloaded once per host; a copy of another size, e.g. an interrupted one or an
  older build, is downloaded again; written to a temporary name and renamed, so concurrent
  processes on one host do not see a partial file)."""
  if not is_url(path):
    return path
  scheme, rest = path.split("://", 1)
  local = os.path.join(cache_dir(), scheme, *rest.split("/"))
  size = getsize(path)
  if os.path.isfile(local) and os.path.getsize(local) == size:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.part{os.getpid()}"
  try:
    copy(path, tmp)
    if os.path.getsize(tmp) != size:
      raise OSError(f"staging {path} to {local}: got {os.path.getsize(tmp)} of {size} bytes")
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("staged %s (%d bytes) to %s", path, size, local)
  return local
