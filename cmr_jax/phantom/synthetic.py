"""The embedded default dataset: phantom studies from several protocol families, with rescans.

Subjects `0 .. num_subjects-1` are scanned at the internal `sites` (round robin) and split by
subject into train/val/test; subjects `num_subjects .. num_subjects+num_external-1` are scanned at
`external_site` only and form the "external" split (another protocol family, for external-site
tests); the next `num_archive` subjects, scanned at `archive_sites` (round robin), are the
pre-training archive (splits "archive" and "archive_val"): contrastive pre-training reads only
them, so no subject it sees is fine-tuned on or scored, as the paper pre-trained on institutional
archives and fine-tuned and tested on UK Biobank. The last `num_calib` subjects, scanned at the
internal sites (round robin), form the split "calib": held out from fine-tuning and checkpoint
selection, they calibrate the fine-tuned model's prediction intervals (`cmr_jax.intervals`).
Appending subjects leaves every earlier subject, and its split, as it was. A deterministic
`rescan_fraction` of subjects gets a second visit (same heart, new acquisition) for scan-rescan
repeatability; a rescan stays in its subject's split.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.data import splits
from cmr_jax.phantom import simulator

_RESCAN_PURPOSE = "rescan"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What synthetic dataset to make.

  Attributes:
    seed: dataset seed: fixes every subject and acquisition.
    num_subjects: subjects at the internal sites (train/val/test).
    sites: internal protocol families (keys of `simulator.SITES`), assigned round robin.
    num_external: subjects at `external_site` (split "external"); 0 for none.
    external_site: the held-out protocol family.
    num_archive: pre-training archive subjects (splits "archive", "archive_val"); 0 for none.
    archive_sites: protocol families of the archive (round robin); empty: the internal `sites`.
    num_calib: calibration subjects at the internal sites (split "calib"); 0 for none.
    rescan_fraction: fraction of subjects scanned twice.
    frames: rendered frames per cycle (the fast phantom protocol).
    matrix: rendered square matrix (the fast phantom protocol).
    fractions: internal split fractions by subject.
    split_salt: salt of the subject hash that assigns splits.
  """

  seed: int = 0
  num_subjects: int = 300
  sites: tuple[str, ...] = ("ukbb_like", "kaggle_like")
  num_external: int = 60
  external_site: str = "siteC"
  num_archive: int = 0
  archive_sites: tuple[str, ...] = ()
  num_calib: int = 0
  rescan_fraction: float = 0.1
  frames: int = 16
  matrix: int = 112
  fractions: tuple[tuple[str, float], ...] = splits.DEFAULT_FRACTIONS
  split_salt: str = "cmr-jax"

  def __post_init__(self):
    unknown = [s for s in (*self.sites, self.external_site, *self.archive_sites)
               if s not in simulator.SITES]
    if unknown:
      raise ValueError(f"unknown phantom sites {unknown}; expected among {sorted(simulator.SITES)}")
    if self.external_site in self.sites and self.num_external:
      raise ValueError(f"external site {self.external_site!r} is also an internal site")
    if self.external_site in self.archive_sites and self.num_external and self.num_archive:
      raise ValueError(f"external site {self.external_site!r} is also an archive site")
    if (self.num_subjects < 1 or self.num_external < 0 or self.num_archive < 0
        or self.num_calib < 0):
      raise ValueError("need num_subjects >= 1, num_external >= 0, num_archive >= 0 and "
                       "num_calib >= 0")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> SyntheticSpec:
    """From a plain mapping (e.g. an ml_collections ConfigDict's `to_dict()`)."""
    values = dict(values)
    for key in ("sites", "archive_sites"):
      if key in values:
        values[key] = tuple(values[key])
    if "fractions" in values and isinstance(values["fractions"], Mapping):
      values["fractions"] = tuple((k, float(v)) for k, v in values["fractions"].items())
    return cls(**values)

  def splitter(self) -> splits.SubjectSplitter:
    """The subject-grouped split rule of this dataset."""
    external = (self.external_site,) if self.num_external else ()
    first = self.num_subjects + self.num_external
    plan = self.plan()
    archive = frozenset(subject_id(self.seed, i) for i, _ in plan[first:first + self.num_archive])
    calib = frozenset(subject_id(self.seed, i) for i, _ in plan[first + self.num_archive:])
    return splits.SubjectSplitter(salt=self.split_salt, fractions=self.fractions,
                                  external_sites=frozenset(external), archive_subjects=archive,
                                  calib_subjects=calib)

  def plan(self) -> list[tuple[int, str]]:
    """(subject index, site) of every subject: internal, external, archive, then calibration."""
    plan = [(i, self.sites[i % len(self.sites)]) for i in range(self.num_subjects)]
    first = self.num_subjects
    plan += [(first + j, self.external_site) for j in range(self.num_external)]
    first += self.num_external
    archive_sites = self.archive_sites or self.sites
    plan += [(first + j, archive_sites[j % len(archive_sites)]) for j in range(self.num_archive)]
    first += self.num_archive
    plan += [(first + j, self.sites[j % len(self.sites)]) for j in range(self.num_calib)]
    return plan


def subject_id(seed: int, index: int) -> str:
  """The subject id of phantom subject `index` of dataset `seed` (as `simulator.synthetic_study`)."""
  return f"syn-{seed}-{index:06d}"


def build_items(spec: SyntheticSpec) -> list[records.BuildItem]:
  """One build item per (subject, visit): picklable loaders of phantom studies."""
  items = []
  for index, site in spec.plan():
    subject = subject_id(spec.seed, index)
    visits = 2 if splits.unit_hash(subject, spec.split_salt, _RESCAN_PURPOSE) < spec.rescan_fraction else 1
    for visit in range(visits):
      load = functools.partial(simulator.synthetic_study, spec.seed, index, site=site, visit=visit,
                               fast=True, frames=spec.frames, matrix=spec.matrix)
      items.append(records.BuildItem(f"{subject}-v{visit}@{site}", load))
  return items


def build_synthetic(spec: SyntheticSpec, out_dir: str, *, cfg: preprocess.PreprocessConfig,
                    num_shards: int = 4, num_workers: int = 0) -> records.BuildSummary:
  """Renders, preprocesses and writes the synthetic dataset `spec` to `out_dir`."""
  return records.build_dataset(build_items(spec), out_dir, cfg=cfg, split_fn=spec.splitter(),
                               num_shards=num_shards, num_workers=num_workers)


def summary_table(data_dir: str) -> str:
  """A plain-text table of a built dataset: studies, subjects, sites and LVEF per split."""
  info = records.read_dataset_info(data_dir)
  lines = [f"dataset {data_dir}",
           f"{'split':<10}{'studies':>8}{'subjects':>9}{'labelled':>9}  {'LVEF mean+-SD':>14}"
           f"{'<40%':>7}  sites"]
  for split, s in info["splits"].items():
    lvef = np.array([m["lvef"] for m in records.load_index(data_dir, split)
                     if m["lvef"] is not None], np.float64)
    stats = (f"{lvef.mean():6.1f} +-{lvef.std():5.1f}{100 * np.mean(lvef < 40):6.1f}%"
             if lvef.size else f"{'-':>14}{'-':>7}")
    sites = ", ".join(f"{k}:{v}" for k, v in s["sites"].items())
    lines.append(f"{split:<10}{s['num_records']:>8}{s['subjects']:>9}{s['labelled']:>9}  "
                 f"{stats}  {sites}")
  lines.append(f"skipped {len(info['skipped'])} items, {len(info['duplicates'])} duplicates, "
               f"{len(info['skipped_cines'])} cines; preprocessing {info['preprocess']}")
  return "\n".join(lines)
