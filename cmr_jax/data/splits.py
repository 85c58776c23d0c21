"""Deterministic, subject-grouped dataset splits and label-fraction subsets.

A subject's split depends only on a keyed hash of (salt, subject_id): every study of a subject,
rescans included, lands in the same split, whatever order or machine builds the dataset.
Studies from designated external sites form the split "external" (held out from development);
a subject seen at an internal and at an external site therefore has studies in both its hashed
split and "external": external evaluation is about the site, not the subject.

A pre-training archive (the paper pre-trained on institutional archives and fine-tuned on UK
Biobank) is a set of subjects that appear in no other split: their studies go to "archive"
(contrastive pre-training) or "archive_val" (its zero-shot retrieval check), by a keyed hash.

Calibration subjects (`calib_subjects`) go to split "calib" only: studies that neither train a
fine-tuned model nor choose its checkpoint, on which its prediction intervals are calibrated
(`cmr_jax.intervals`). A dataset without designated calibration subjects can have a "calib"
split among its hashed fractions instead.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import math
from typing import Protocol

DEFAULT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
EXTERNAL = "external"
ARCHIVE = "archive"
ARCHIVE_VAL = "archive_val"
CALIB = "calib"  # studies for calibrating a fine-tuned model's prediction intervals
DEFAULT_ARCHIVE_FRACTIONS: tuple[tuple[str, float], ...] = ((ARCHIVE, 0.9), (ARCHIVE_VAL, 0.1))
_LABEL_FRACTION_PURPOSE = "label-fraction"


class HasSubject(Protocol):
  subject_id: str
  site: str


def unit_hash(subject_id: str, salt: str, purpose: str = "split") -> float:
  """A uniform number in [0, 1) from sha256 of (purpose, salt, subject_id)."""
  digest = hashlib.sha256(f"{purpose}\0{salt}\0{subject_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class SubjectSplitter:
  """Maps a study (anything with subject_id and site) to its split; picklable.

  Attributes:
    salt: hashing salt; a different salt gives an independent split.
    fractions: (split, fraction) pairs summing to 1, in order along [0, 1).
    external_sites: sites whose studies all go to split "external".
    archive_subjects: subjects reserved for pre-training: every study of theirs goes to
      "archive" or "archive_val" (by `archive_fractions`), at any site, and to no other split.
    archive_fractions: (split, fraction) pairs of the archive, summing to 1.
    calib_subjects: subjects whose every study goes to "calib" (at an internal site).
  """

  salt: str = "cmr-jax"
  fractions: tuple[tuple[str, float], ...] = DEFAULT_FRACTIONS
  external_sites: frozenset[str] = frozenset()
  archive_subjects: frozenset[str] = frozenset()
  archive_fractions: tuple[tuple[str, float], ...] = DEFAULT_ARCHIVE_FRACTIONS
  calib_subjects: frozenset[str] = frozenset()

  def __post_init__(self):
    names = [name for name, _ in self.fractions]
    archive = [name for name, _ in self.archive_fractions]
    reserved = {EXTERNAL, *archive}
    if len(set(names)) != len(names) or reserved & set(names) or len(set(archive)) != len(archive):
      raise ValueError(f"split names must be unique and not among {sorted(reserved)}: {names}")
    for fractions in (self.fractions, self.archive_fractions):
      values = [value for _, value in fractions]
      if any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be >= 0 and sum to 1: {dict(fractions)}")
    object.__setattr__(self, "external_sites", frozenset(self.external_sites))
    object.__setattr__(self, "archive_subjects", frozenset(self.archive_subjects))
    object.__setattr__(self, "calib_subjects", frozenset(self.calib_subjects))
    both = self.calib_subjects & self.archive_subjects
    if both:
      raise ValueError(f"{len(both)} subjects are both calibration and archive subjects, e.g. "
                       f"{sorted(both)[0]}")

  @classmethod
  def from_mapping(cls, fractions: collections.abc.Mapping[str, float], *, salt: str,
                   external_sites: collections.abc.Iterable[str] = ()) -> SubjectSplitter:
    """Builds a splitter from a {split: fraction} mapping (kept in its iteration order)."""
    return cls(salt=salt, fractions=tuple((k, float(v)) for k, v in fractions.items()),
               external_sites=frozenset(external_sites))

  def split_of_subject(self, subject_id: str) -> str:
    """The internal split of a subject (an archive split for an archive subject, "calib" for a
    calibration subject)."""
    if subject_id in self.calib_subjects:
      return CALIB
    archive = subject_id in self.archive_subjects
    fractions = self.archive_fractions if archive else self.fractions
    u = unit_hash(subject_id, self.salt, "archive" if archive else "split")
    edge = 0.0
    for name, fraction in fractions:
      edge += fraction
      if u < edge:
        return name
    return fractions[-1][0]  # u just below 1 with rounding in the sum

  def __call__(self, study: HasSubject) -> str:
    """The split of a study or record."""
    if study.subject_id not in self.archive_subjects and study.site in self.external_sites:
      return EXTERNAL
    return self.split_of_subject(study.subject_id)


def in_label_fraction(subject_id: str, fraction: float, salt: str = "cmr-jax") -> bool:
  """Whether a subject belongs to the deterministic `fraction` subset of subjects.

  Subsets are nested: the 1% subset lies inside the 10% subset, which lies inside 100%.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"label fraction must be in [0, 1], got {fraction}")
  return unit_hash(subject_id, salt, _LABEL_FRACTION_PURPOSE) < fraction
