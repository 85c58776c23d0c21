"""The output row of one study: a typed, frozen `Row` and its JSON form (`Row.to_dict`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from cmr_jax.data import quality


@dataclasses.dataclass(frozen=True)
class BagView:
  """One cine of the model's bag.

  Attributes:
    view: the view name (`types.SAX`, "2CH", "3CH", "4CH").
    slice: for a short-axis slice its index from the base (0), else None.
    attention: its attention weight in the model's pooling (the bag's weights sum to 1).
  """

  view: str
  slice: int | None
  attention: float


@dataclasses.dataclass(frozen=True)
class Row:
  """One study's prediction, or the reason there is none.

  LVEF values (`lvef`, `interval`, `loo_se`, `lvef_reference`) are in percent (LVEF points);
  a row without a prediction has `lvef`, `interval`, `loo_se`, the flags None and no views.

  Attributes:
    input: the input path (or "data_dir:split") as given: rows are keyed by it.
    study: the study's pseudonym ("" when the input held no readable study).
    lvef: the predicted LVEF (%) of the study's full bag.
    interval: (low, high) of the ~95% prediction interval (%), clipped to 0-100; None without
      any error estimate.
    interval_method: how the interval was made (the formula and its terms), or why there is none.
    loo_se: the jackknife standard error (LVEF points) over the leave-one-cine-out predictions;
      None when not computed or for a bag of one cine.
    lvef_below_40: the predicted LVEF is below 40%.
    interval_includes_40: 40% lies within the interval.
    views: the cines of the model's bag, in bag order.
    warnings: quality warnings of the input, the study and the prediction.
    error: why the study has no prediction ("" when it has one).
    lvef_reference: the reference LVEF (%) of a labelled record or labels CSV, else None.
  """

  input: str
  study: str = ""
  lvef: float | None = None
  interval: tuple[float, float] | None = None
  interval_method: str = ""
  loo_se: float | None = None
  lvef_below_40: bool | None = None
  interval_includes_40: bool | None = None
  views: tuple[BagView, ...] = ()
  warnings: tuple[quality.QualityWarning, ...] = ()
  error: str = ""
  lvef_reference: float | None = None

  def to_dict(self) -> dict[str, Any]:
    """The row as written to JSON: these keys in this order, lists for interval, views and
    warnings (views and warnings as dicts)."""
    return {
        "input": self.input, "study": self.study, "lvef": self.lvef,
        "interval": None if self.interval is None else list(self.interval),
        "interval_method": self.interval_method, "loo_se": self.loo_se,
        "lvef_below_40": self.lvef_below_40, "interval_includes_40": self.interval_includes_40,
        "views": [dataclasses.asdict(v) for v in self.views],
        "warnings": [dataclasses.asdict(w) for w in self.warnings],
        "error": self.error, "lvef_reference": self.lvef_reference}
