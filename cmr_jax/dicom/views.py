"""Naming views from series names: SAX, 2CH, 3CH, 4CH, an unspecified long axis, or non-cine.

`classify_name` reads one name (SeriesDescription, ProtocolName or a folder name) after
`normalise_name`; `classify_series` takes the first informative name of a series. Names of
non-cine series (scouts, derived results, flow, tagging, maps, LGE, perfusion, great vessels,
axial/coronal/sagittal stacks, morphology) are recognised before the view names.
"""

from __future__ import annotations

import dataclasses
import re

from cmr_jax.data import types
from cmr_jax.dicom import parse

LAX = "LAX"  # a long-axis view whose chamber count the name does not say


def normalise_name(text: str) -> str:
  """Lower case, punctuation to spaces, letters and digits split: `SAX_b1` -> `sax b 1`."""
  text = re.sub(r"[^a-z0-9*]+", " ", text.lower())
  text = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", text)
  return " ".join(text.split())


_CHAMBER = r"(ch|chamber|chambers|chbr|cv|c|k|kb|kammer)"
# (what, pattern) over normalised names; checked before the view patterns.
_NON_CINE = (
    ("derived results", r"\binline ?vf\b|\bvf\b|\bresults?\b|\bevaluation\b|\bmpr\b|\bmip\b"
                        r"|\bscreen ?(shot|save)\b|\bsegmentation\b"),
    ("scout/localiser", r"\b(scout|locali[sz]er|loc|survey|pilot|tri ?pilot|plan|planning)\b"
                        r"|\b(3|three) plane\b"),
    ("flow/phase contrast", r"\b(flow|q ?flow|pc|phase contrast|venc|velocity|vel)\b"),
    ("tagging", r"\b(tag|tags|tagging|tagged|grid|spamm|c ?spamm)\b"),
    ("parametric map", r"\b(molli|shmolli|sh molli|sasha|ecv|map|maps|mapping)\b"
                       r"|\bt [12]\b(?! ?\*? ?(ch|chamber)\b)|\bt 2 ?\*|\bt 2 star\b"),
    ("late gadolinium enhancement", r"\b(lge|de|psir|mde|ir|delayed|viability|late gad\w*"
                                    r"|late enhancement|ti scout|look locker|inversion)\b"),
    ("perfusion", r"\b(perf|perfusion|fpp|first pass)\b"),
    ("great vessels/right heart view", r"\b(ao|aorta|aortic|aort|asc|arch|pa|pulmonary|rvot"
                                       r"|tricuspid|angio|mra|tof|coronary)\b|\brv (2|3) ch\b"),
    ("axial/coronal/sagittal stack", r"\b(axial|ax|transverse|tra|trans|coronal|cor|sagittal"
                                     r"|sag)\b"),
    ("morphology (non-cine)", r"\b(haste|stir|tse|fse|dwi|diffusion|black blood|dark blood|bb"
                              r"|db|t 2 w|t 1 w)\b"),
)
_VIEW_PATTERNS = (
    (types.LAX_3CH, rf"\b(3|three) ?{_CHAMBER}\b|\bch 3\b|\blvot\b|\bplax\b|\balax\b"
                    r"|\bapical long axis\b"),
    (types.LAX_4CH, rf"\b(4|four) ?{_CHAMBER}\b|\bch 4\b|\bhla\b|\bhorizontal long axis\b"),
    (types.LAX_2CH, rf"\b(2|two) ?{_CHAMBER}\b|\bch 2\b|\bvla\b|\bvertical long axis\b"),
    (types.SAX, r"\bsax\w*|\bsa\b|\bshort ?axis\b|\bsht ax\b|\bkurzachse\b|\bstack\b"),
    (LAX, r"\b(lax|la|long ?axis|langachse)\b"),
)


@dataclasses.dataclass(frozen=True)
class NameClass:
  """What a series name says: a view (`types.VIEWS` or `LAX`), a non-cine kind, or nothing."""

  view: str = ""
  non_cine: str = ""


def classify_name(text: str) -> NameClass:
  """Classifies one series name (description, protocol or folder name).

  Examples: `CINE_segmented_LAX_4Ch`, `cine_4ch`, `4 CH`, `HLA` -> 4CH; `VLA`, `2ch_21` -> 2CH;
  `LVOT`, `3 chamber` -> 3CH; `sax_5`, `CINE_segmented_SAX_b3`, `FIESTA CINE SA`, `short axis`
  -> SAX; `cine LAX` -> LAX (which one decided by geometry); `CINE_segmented_SAX_InlineVF`,
  `localizer`, `T1 MOLLI` -> non-cine; `trufi_retro` -> nothing (geometry decides).
  """
  name = normalise_name(text)
  for what, pattern in _NON_CINE:
    if re.search(pattern, name):
      return NameClass(non_cine=what)
  for view, pattern in _VIEW_PATTERNS:
    if re.search(pattern, name):
      return NameClass(view=view)
  return NameClass()


def classify_series(series: parse.SeriesInfo) -> NameClass:
  """The first informative class among the series' description, protocol and folder names."""
  for text in (series.description, series.protocol, series.folder):
    result = classify_name(text)
    if result.view or result.non_cine:
      return result
  return NameClass()

