"""Radiology-style cine CMR reports written from a subject's findings, with varied wording.

Every statement is graded from the ground truth with fixed thresholds (below), then worded with
a random choice of synonyms, sentence templates and order; numbers (LVEF, volumes, wall
thickness) are sometimes stated, truncated to integers so that a stated number never crosses a
grade threshold (e.g. LVEF 29.7% is "severely reduced" and stated as 29%).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Grades and their lower thresholds, checked from the top.
LVEF_GRADES = (("hyperdynamic", 70.0), ("normal", 50.0), ("mildly reduced", 40.0),
               ("moderately reduced", 30.0), ("severely reduced", -math.inf))
RVEF_GRADES = (("normal", 45.0), ("mildly reduced", 40.0), ("moderately reduced", 30.0),
               ("severely reduced", -math.inf))
LV_SIZE_GRADES = (("severely dilated", 300.0), ("moderately dilated", 250.0),
                  ("mildly dilated", 210.0), ("normal", -math.inf))  # by EDV, mL
WALL_GRADES = (("severely increased", 20.0), ("moderately increased", 15.0),
               ("mildly increased", 12.0), ("normal", -math.inf))  # by ED wall thickness, mm
AKINESIS_SEVERITY = 0.75  # RWMA severity from which the territory is called akinetic
LA_DILATED_RADIUS_MM = 22.0

FUNCTION_WORDS: dict[str, tuple[str, ...]] = {
    "hyperdynamic": ("hyperdynamic", "vigorous"),
    "normal": ("normal", "preserved", "within normal limits"),
    "mildly reduced": ("mildly reduced", "mildly impaired", "mildly depressed"),
    "moderately reduced": ("moderately reduced", "moderately impaired", "moderately depressed"),
    "severely reduced": ("severely reduced", "severely impaired", "severely depressed"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "normal": ("normal in size", "not dilated", "of normal dimensions"),
    "mildly dilated": ("mildly dilated", "mildly enlarged"),
    "moderately dilated": ("moderately dilated", "moderately enlarged"),
    "severely dilated": ("severely dilated", "markedly dilated"),
}
WALL_WORDS: dict[str, tuple[str, ...]] = {
    "normal": ("normal wall thickness", "no left ventricular hypertrophy",
               "normal myocardial thickness"),
    "mildly increased": ("mild concentric left ventricular hypertrophy",
                         "mildly increased wall thickness"),
    "moderately increased": ("moderate concentric left ventricular hypertrophy",
                             "moderately increased wall thickness"),
    "severely increased": ("severe concentric left ventricular hypertrophy",
                           "markedly increased wall thickness"),
}
TERRITORY_WALLS: dict[str, str] = {
    "LAD": "anterior and anteroseptal walls and the apex",
    "RCA": "inferior and inferoseptal walls",
    "LCx": "lateral and inferolateral walls",
}
MOTION_WORDS = {"hypokinesis": ("hypokinesis", "hypokinetic"), "akinesis": ("akinesis", "akinetic")}

_LV = ("The left ventricle", "The LV", "The left ventricular cavity")
_LV_FUNCTION = ("Left ventricular systolic function", "LV systolic function",
                "Global left ventricular systolic function", "Global LV function")
_TECHNIQUE = ("Cine SSFP imaging in short-axis and long-axis planes.",
              "Balanced SSFP cines were acquired in the standard long-axis views and a short-axis "
              "stack.",
              "Cardiac MRI with cine imaging.")
_FILLERS = ("No pericardial effusion.", "The valves appear unremarkable on cine imaging.",
            "The aortic root is normal in calibre.", "Good quality study.")
_IMPRESSION = ("Impression:", "Conclusion:", "Summary:")


@dataclasses.dataclass(frozen=True)
class Findings:
  """What a report describes besides LVEF and the LV volumes.

  Attributes:
    wall_thickness_mm: LV wall thickness at end-diastole.
    rwma_territory: "" for none, else a key of TERRITORY_WALLS.
    rwma_severity: 0 (normal motion) .. 1 (akinetic).
    rvef: right ventricular ejection fraction, %.
    la_radius_mm: left atrial size (radius of the equivalent body).
  """

  wall_thickness_mm: float
  rwma_territory: str = ""
  rwma_severity: float = 0.0
  rvef: float = 60.0
  la_radius_mm: float = 18.0


def _attributive(word: str) -> str:
  """A grade word usable before a noun ("within normal limits" is not)."""
  return "normal" if word == "within normal limits" else word


def _grade(value: float, grades: tuple[tuple[str, float], ...]) -> str:
  for name, lower in grades:
    if value >= lower:
      return name
  raise AssertionError("grades end with -inf")


def lvef_grade(lvef: float) -> str:
  """LV systolic function grade of an LVEF (%): thresholds 30, 40, 50 and 70 (hyperdynamic)."""
  return _grade(lvef, LVEF_GRADES)


def rvef_grade(rvef: float) -> str:
  """RV systolic function grade of an RVEF (%): thresholds 30, 40 and 45."""
  return _grade(rvef, RVEF_GRADES)


def lv_size_grade(edv_ml: float) -> str:
  """LV size grade from the end-diastolic volume (mL): thresholds 210, 250 and 300."""
  return _grade(edv_ml, LV_SIZE_GRADES)


def wall_grade(thickness_mm: float) -> str:
  """Wall thickness grade (mm): thresholds 12, 15 and 20."""
  return _grade(thickness_mm, WALL_GRADES)


def motion_grade(severity: float) -> str:
  """Regional wall motion word for an RWMA severity: hypokinesis or akinesis."""
  return "akinesis" if severity >= AKINESIS_SEVERITY else "hypokinesis"


def _check(findings: Findings, lvef: float, edv: float, esv: float) -> None:
  problems = []
  if not 0.0 <= lvef <= 100.0:
    problems.append(f"lvef {lvef} is not a percentage")
  if not (math.isfinite(edv) and math.isfinite(esv) and 0.0 <= esv <= edv and edv > 0.0):
    problems.append(f"volumes edv={edv}, esv={esv} are not 0 <= esv <= edv")
  if findings.rwma_territory and findings.rwma_territory not in TERRITORY_WALLS:
    problems.append(f"unknown territory {findings.rwma_territory!r}; "
                    f"expected one of {sorted(TERRITORY_WALLS)}")
  if not 0.0 <= findings.rvef <= 100.0:
    problems.append(f"rvef {findings.rvef} is not a percentage")
  if not findings.wall_thickness_mm > 0.0:
    problems.append(f"wall thickness {findings.wall_thickness_mm} is not positive")
  if problems:
    raise ValueError("cannot write report: " + "; ".join(problems))


def write_report(findings: Findings, lvef: float, edv: float, esv: float,
                 rng: np.random.Generator) -> str:
  """Writes a radiology-style report consistent with the findings, LVEF (%) and volumes (mL).

  Args:
    findings: wall thickness, wall motion, RV function and LA size.
    lvef: LV ejection fraction, %.
    edv: LV end-diastolic volume, mL.
    esv: LV end-systolic volume, mL.
    rng: draws the wording (synonyms, templates, which numbers appear, sentence order).

  Returns:
    The report text, sentences separated by spaces.

  Raises:
    ValueError: on values that no report can describe (naming them).
  """
  _check(findings, lvef, edv, esv)
  pick = lambda options: options[int(rng.integers(len(options)))]
  function = lvef_grade(lvef)
  size = lv_size_grade(edv)
  wall = wall_grade(findings.wall_thickness_mm)
  rv = rvef_grade(findings.rvef)
  ef_text = f"{math.floor(lvef)}%"

  fn_word = pick(FUNCTION_WORDS[function])
  subject = pick(_LV_FUNCTION)
  if rng.random() < 0.6:
    fn_sentence = pick((f"{subject} is {fn_word} (LVEF {ef_text}).",
                        f"{subject} is {fn_word}, with an ejection fraction of {ef_text}.",
                        f"The left ventricular ejection fraction is {fn_word} at {ef_text}."))
  else:
    fn_sentence = f"{subject} is {fn_word}."
  body = [f"{pick(_LV)} is {pick(SIZE_WORDS[size])}."]
  wall_text = pick(WALL_WORDS[wall])
  if rng.random() < 0.3:
    wall_text += f" (maximal wall thickness {math.floor(findings.wall_thickness_mm)} mm)"
  body.append(f"There is {wall_text}.")
  body.append(fn_sentence)
  if rng.random() < 0.35:
    body.append(pick((f"End-diastolic volume {math.floor(edv)} mL, end-systolic volume "
                      f"{math.floor(esv)} mL.",
                      f"LVEDV {math.floor(edv)} mL and LVESV {math.floor(esv)} mL.")))
  motion = ""
  if findings.rwma_territory:
    motion = motion_grade(findings.rwma_severity)
    noun, adjective = MOTION_WORDS[motion]
    walls, territory = TERRITORY_WALLS[findings.rwma_territory], findings.rwma_territory
    body.append(pick((f"There is regional {noun} of the {walls} ({territory} territory).",
                      f"The {walls} are {adjective}, in keeping with {territory} territory "
                      "disease.",
                      f"Regional wall motion abnormality: {noun} of the {walls}.")))
  elif function in ("normal", "hyperdynamic"):
    body.append(pick(("No regional wall motion abnormality.",
                      "There are no regional wall motion abnormalities.",
                      "Regional wall motion is normal.")))
  else:
    body.append(pick(("There is global hypokinesis without a regional pattern.",
                      "Hypokinesis is global rather than regional.")))
  rv_word = pick(FUNCTION_WORDS[rv])
  rv_text = pick((f"Right ventricular systolic function is {rv_word}",
                  f"RV systolic function is {rv_word}",
                  f"The right ventricle has {_attributive(rv_word)} systolic function"))
  if rng.random() < 0.25:
    rv_text += f" (RVEF {math.floor(findings.rvef)}%)"
  body.append(rv_text + ".")
  if findings.la_radius_mm >= LA_DILATED_RADIUS_MM:
    body.append(pick(("The left atrium is dilated.", "There is left atrial dilatation.")))
  elif rng.random() < 0.3:
    body.append("The left atrium is normal in size.")
  if rng.random() < 0.5:
    body.insert(int(rng.integers(len(body) + 1)), pick(_FILLERS))
  if rng.random() < 0.4:
    body = [body[i] for i in rng.permutation(len(body))]

  summary = f"{'normal-sized' if size == 'normal' else size} {pick(('left ventricle', 'LV'))}"
  summary += f" with {_attributive(fn_word)} systolic function"
  if rng.random() < 0.5:
    summary += f" (EF {ef_text})"
  if motion:
    summary += f" and {findings.rwma_territory} territory {MOTION_WORDS[motion][0]}"
  if wall != "normal":
    summary += f"; {WALL_WORDS[wall][0]}"
  if rv != "normal":
    summary += f"; {FUNCTION_WORDS[rv][0]} RV systolic function"
  impression = f"{pick(_IMPRESSION)} {summary[0].upper()}{summary[1:]}."
  sentences = ([pick(_TECHNIQUE)] if rng.random() < 0.3 else []) + body
  placement = rng.random()
  if placement < 0.5:
    sentences.append(impression)
  elif placement < 0.7:
    sentences.insert(0, impression)
  return " ".join(sentences)
