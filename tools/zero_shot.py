r"""Zero-shot video <-> report retrieval (recall@1/5/10, median rank) of a pre-training checkpoint.

  python tools/zero_shot.py --workdir=runs/demo/pretrain --split=test
  python tools/zero_shot.py --workdir=runs/demo/pretrain --step=100 --split=external \
      --output=zero_shot_external.json

Embeds every study with a report in the split (one eval clip and its report), ranks all reports
for each video and all videos for each report, prints a table and writes the JSON (default
`{workdir}/zero_shot_{split}_step{N}.json`).
"""

import json
import os

from absl import flags
from absl import logging

from cmr_jax.eval import zero_shot
from cmr_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training run folder.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Dataset (default: the run's config.data.dir).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to retrieve within.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the run's).")
_OUTPUT = flags.DEFINE_string("output", "", "JSON output (default: in --workdir).")


def main() -> None:
  result = zero_shot.evaluate(_WORKDIR.value, step=_STEP.value, data_dir=_DATA_DIR.value or None,
                              split=_SPLIT.value, batch_size=_BATCH.value)
  output = _OUTPUT.value or os.path.join(
      _WORKDIR.value, f"zero_shot_{_SPLIT.value}_step{result['step']}.json")
  with open(output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"zero-shot retrieval on {result['split']} ({result['n']} studies), step "
        f"{result['step']} of {result['workdir']}:")
  print(zero_shot.table(result))
  logging.info("written to %s", output)


if __name__ == "__main__":
  logs.run(main)
