r"""Times `tools/ingest.py` against a baseline checkout, side by side, and compares the outputs.

  python tools/make_dicom_tree.py --out=/tmp/kaggle_tree          # 40 studies, ~286 files each
  git -C . archive <old-commit> | tar -x -C /tmp/ingest_old        # the code to compare with
  python tools/bench_ingest.py --input=/tmp/kaggle_tree --baseline=/tmp/ingest_old \
      --workdir=/tmp/bench_ingest --workers=2 --rounds=2

Each round runs the baseline's ingest and then this checkout's, one after the other (so that
a shared machine's load falls on both alike), each a fresh process as a user runs it. Prints
studies/s and studies/s per core (the conversion rate of the ingest summary over the worker
processes) per run, studies per CPU-second of the whole run (every process, start-up, discovery
and writing included: less sensitive than wall time to other jobs on the machine), the ratios of
the medians, whether the two outputs hold the same records
(pixels compared exactly: the number of differing uint8 values and the largest difference),
manifests and dataset_info, then one JSON line.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from absl import flags
from absl import logging
import numpy as np

from cmr_jax import logs
from cmr_jax.data import records

_INPUT = flags.DEFINE_string("input", None, "Kaggle-layout tree (tools/make_dicom_tree.py).",
                             required=True)
_BASELINE = flags.DEFINE_string("baseline", "", "Checkout of the code to compare with ('' for "
                                "none: time this checkout only).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_ingest", "Where the outputs go.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Ingest worker processes.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Runs of each checkout, alternated.")
_LAYOUT = flags.DEFINE_string("layout", "kaggle", "Layout of --input.")

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELDS = ("study_id", "subject_id", "site", "views", "slice_index", "slice_position_mm",
           "source_spacing_mm", "spacing_mm", "lvef", "edv", "esv", "report", "visit")


def run_ingest(checkout: str, output: str) -> dict:
  """One ingest run of `checkout` (a fresh process); its summary JSON plus the wall time."""
  env = dict(os.environ, PYTHONPATH=checkout)
  command = [sys.executable, os.path.join(checkout, "tools", "ingest.py"),
             f"--layout={_LAYOUT.value}", f"--input={_INPUT.value}", f"--output={output}",
             "--allow_default_salt", f"--workers={_WORKERS.value}", "--overwrite"]
  start, cpu_start = time.monotonic(), _children_cpu_s()
  done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True,
                        check=False)
  wall, cpu = time.monotonic() - start, _children_cpu_s() - cpu_start
  if done.returncode:
    raise RuntimeError(f"ingest of {checkout} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  summary["wall_s"], summary["cpu_s"] = wall, cpu
  summary["studies_per_cpu_s"] = summary["converted"] / cpu
  return summary


def _children_cpu_s() -> float:
  """CPU seconds (user + system) of the finished child processes and their descendants."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def compare_outputs(a: str, b: str) -> dict:
  """What differs between two ingest outputs: records (pixels exactly), manifest, info."""
  info_a, info_b = records.read_dataset_info(a), records.read_dataset_info(b)
  out = {"same_splits": sorted(info_a["splits"]) == sorted(info_b["splits"]),
         "records": 0, "records_differing": 0, "pixels_differing": 0, "max_pixel_diff": 0,
         "metadata_differing": 0}
  for split in sorted(set(info_a["splits"]) & set(info_b["splits"])):
    source_a, source_b = records.open_split(a, split), records.open_split(b, split)
    by_id = {source_b.metadata[i]["study_id"]: i for i in range(len(source_b))}
    for i in range(len(source_a)):
      ra = source_a[i]
      j = by_id.get(ra.study_id)
      out["records"] += 1
      if j is None:
        out["records_differing"] += 1
        continue
      rb = source_b[j]
      same_meta = all(np.array_equal(np.asarray(getattr(ra, f)), np.asarray(getattr(rb, f)),
                                     equal_nan=np.asarray(getattr(ra, f)).dtype.kind == "f")
                      for f in _FIELDS)
      out["metadata_differing"] += not same_meta
      if ra.frames.shape != rb.frames.shape:
        out["records_differing"] += 1
        continue
      diff = np.abs(ra.frames.astype(np.int16) - rb.frames.astype(np.int16))
      out["pixels_differing"] += int(np.count_nonzero(diff))
      out["max_pixel_diff"] = max(out["max_pixel_diff"], int(diff.max()))
      out["records_differing"] += bool(diff.any()) or not same_meta
  with open(os.path.join(a, "manifest.csv"), "rb") as fa, open(
      os.path.join(b, "manifest.csv"), "rb") as fb:
    out["manifest_identical"] = fa.read() == fb.read()
  strip = lambda info: {k: v for k, v in info.items() if k != "parts"}
  out["dataset_info_identical"] = strip(info_a) == strip(info_b)
  return out


def main() -> None:
  checkouts = {"new": _HERE}
  if _BASELINE.value:
    checkouts = {"baseline": os.path.abspath(_BASELINE.value), **checkouts}
  os.makedirs(_WORKDIR.value, exist_ok=True)
  cores = max(1, min(_WORKERS.value, len(os.sched_getaffinity(0))))
  runs: dict[str, list[dict]] = {name: [] for name in checkouts}
  for r in range(_ROUNDS.value):
    for name, checkout in checkouts.items():
      output = os.path.join(_WORKDIR.value, name)
      summary = run_ingest(checkout, output)
      summary["per_core"] = summary["studies_per_s"] / cores
      runs[name].append(summary)
      print(f"round {r + 1} {name:8s}: {summary['studies_per_s']:.2f} studies/s, "
            f"{summary['per_core']:.2f} studies/s/core, {summary['wall_s']:.1f} s wall, "
            f"{summary['studies_per_cpu_s']:.2f} studies per CPU-second of the whole run "
            f"({summary['num_studies']} studies, {summary['files_in']} files)", flush=True)
  result = {"input": _INPUT.value, "workers": _WORKERS.value, "cores": cores,
            "cpus": os.cpu_count(), "rounds": _ROUNDS.value,
            "studies": runs["new"][0]["num_studies"], "files": runs["new"][0]["files_in"]}
  for name, summaries in runs.items():
    result[name] = {"studies_per_s_per_core": [round(s["per_core"], 3) for s in summaries],
                    "median_per_core": round(statistics.median(s["per_core"] for s in summaries),
                                             3),
                    "wall_s": [round(s["wall_s"], 1) for s in summaries],
                    "studies_per_cpu_s": [round(s["studies_per_cpu_s"], 3) for s in summaries]}
  if "baseline" in runs:
    result["ratio"] = round(result["new"]["median_per_core"]
                            / result["baseline"]["median_per_core"], 2)
    result["cpu_ratio"] = round(statistics.median(result["new"]["studies_per_cpu_s"])
                                / statistics.median(result["baseline"]["studies_per_cpu_s"]), 2)
    result["outputs"] = compare_outputs(os.path.join(_WORKDIR.value, "baseline"),
                                        os.path.join(_WORKDIR.value, "new"))
    print(f"new / baseline: {result['ratio']:.2f}x, per CPU-second {result['cpu_ratio']:.2f}x ({result['new']['median_per_core']:.2f} vs "
          f"{result['baseline']['median_per_core']:.2f} studies/s/core, medians); outputs: "
          f"{result['outputs']}")
  logging.info("outputs left in %s", _WORKDIR.value)
  print(json.dumps(result))
  if not _BASELINE.value:
    shutil.rmtree(os.path.join(_WORKDIR.value, "new"), ignore_errors=True)


if __name__ == "__main__":
  logs.run(main)
