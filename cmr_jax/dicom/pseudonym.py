"""Pseudonyms for patient identifiers: keyed HMAC-SHA256 with a user-supplied salt.

Every identifier that leaves ingestion (subject, study, input file) is replaced by
`HMAC-SHA256(salt, "<kind>:<value>")`, truncated to `DIGEST_HEX_CHARS` hex digits and prefixed by
its kind. Without the salt a pseudonym cannot be linked back to the identifier (not even by
hashing a list of candidate identifiers), and the same salt maps the same identifier to the same
pseudonym across runs, so rescans of one subject share a subject pseudonym.

Free text (report text, error messages) is scrubbed of the known identifying values of its study
with `scrub_text`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable

SALT_ENV_VAR = "CMR_JAX_SALT"
# Public, hence not secret: only for demos on synthetic data (`allow_default_salt`).
DEMO_SALT = "cmr-jax-demo-salt-not-secret"
MIN_SALT_CHARS = 8
DIGEST_HEX_CHARS = 20  # 80 bits: collision-free in practice for millions of identifiers
SUBJECT = "sub"
STUDY = "stu"
FILE = "f"
REDACTED = "[redacted]"
_MIN_SCRUB_CHARS = 3  # shorter name parts ("LI", "JO") would erase ordinary words


class SaltError(ValueError):
  """No usable salt was given."""


def resolve_salt(salt: str | None, *, allow_default: bool = False) -> str:
  """Returns the salt to pseudonymise with.

  Args:
    salt: the salt given on the command line, or None/"" to read `CMR_JAX_SALT`.
    allow_default: use the public `DEMO_SALT` when no salt is given (synthetic data only).

  Raises:
    SaltError: when no salt is given (and the default is not allowed) or it is too short.
  """
  salt = salt or os.environ.get(SALT_ENV_VAR, "")
  if not salt:
    if allow_default:
      return DEMO_SALT
    raise SaltError(
        f"no pseudonymisation salt: pass --salt=... or set ${SALT_ENV_VAR} to a secret string of "
        f"at least {MIN_SALT_CHARS} characters, kept with the data owner (the same salt gives the "
        "same pseudonyms in later runs). For synthetic demo data only, --allow_default_salt uses "
        "a public salt.")
  if len(salt) < MIN_SALT_CHARS:
    raise SaltError(f"the pseudonymisation salt must have at least {MIN_SALT_CHARS} characters")
  return salt


def pseudonym(salt: str, kind: str, value: str) -> str:
  """Returns `<kind>-<hex>`: the keyed hash of `value` in the namespace `kind`.

  Text is hashed as UTF-8; file names that are not valid UTF-8 (which Python holds as surrogate
  escapes) are hashed as their original bytes, so every name has a pseudonym.
  """
  message = f"{kind}:{value}".encode("utf-8", "surrogateescape")
  digest = hmac.new(salt.encode("utf-8", "surrogateescape"), message, hashlib.sha256)
  return f"{kind}-{digest.hexdigest()[:DIGEST_HEX_CHARS]}"


def _date_variants(value: str) -> list[str]:
  """Common spellings of a DICOM date `YYYYMMDD` (the value itself when it is not one)."""
  if not re.fullmatch(r"\d{8}", value):
    return [value]
  y, m, d = value[:4], value[4:6], value[6:]
  return [value, f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]


def identifier_strings(values: Iterable[str]) -> list[str]:
  """Expands identifying values into the strings to search for in free text.

  Person names (DICOM PN `FAMILY^GIVEN^MIDDLE`) are split into their components, dates
  (`YYYYMMDD`) expanded into common spellings; empty values and parts shorter than three
  characters are dropped. Other values (institution names, IDs) are searched as a whole.
  """
  found = set()
  for value in values:
    value = str(value or "").strip()
    for part in [value] + re.split(r"[\^=]+", value):
      for variant in _date_variants(part.strip()):
        if len(variant) >= _MIN_SCRUB_CHARS:
          found.add(variant)
  return sorted(found, key=len, reverse=True)


def make_scrubber(identifiers: Iterable[str]) -> Callable[[str], str]:
  """A function replacing every occurrence (case-insensitive) of the identifying strings
  (expanded by `identifier_strings`) by `REDACTED`; build once per study, apply to many texts."""
  strings = identifier_strings(identifiers)
  if not strings:
    return lambda text: text
  pattern = re.compile("|".join(re.escape(s) for s in strings), re.IGNORECASE)
  return lambda text: pattern.sub(REDACTED, text) if text else text


def scrub_text(text: str, identifiers: Iterable[str]) -> str:
  """Replaces every occurrence (case-insensitive) of the identifying strings by `REDACTED`."""
  return make_scrubber(identifiers)(text)
