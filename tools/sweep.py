r"""Checkpoint sweep: a short LVEF fine-tune from every kept pre-training checkpoint.

  python tools/sweep.py --pretrain_dir=runs/demo/pretrain --out=runs/demo/sweep \
      --finetune_config=configs/synthetic_finetune.py:smoke \
      --finetune_config.data.dir=runs/demo/data --label_fraction=0.5

Each checkpoint's fine-tune runs in `{out}/step_{N}/`; its validation and test MAE/MSE go to
`{out}/step_{N}/sweep_result.json`. The table (`sweep.csv`, `sweep.md`, `sweep.json`) and the
plot (`sweep.png`: MAE against pre-training step and loss, with Spearman's rho) are rebuilt from
all result files present at the end of every run. Re-running skips done checkpoints.

Several hosts: run the same command with `--num_shards=H --shard_index=i` on each (checkpoints
are dealt round-robin), or as one SLURM / MPI job of H tasks, each one GPU set
(`srun --ntasks=H --gpus-per-task=1 ...`), which derives the shard from the launcher; then
`--merge` (or any shard's automatic merge after the last one finishes) builds the full table.
The tasks are independent JAX processes: do not join them with `--distributed`.
"""


from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmr_jax.experiments import sweep
from cmr_jax import logs

_PRETRAIN_DIR = flags.DEFINE_string("pretrain_dir", None, "Pre-training run folder.",
                                    required=True)
_OUT = flags.DEFINE_string("out", None, "Sweep folder (default: {pretrain_dir}/sweep).")
_FINETUNE_CONFIG = config_flags.DEFINE_config_file(
    "finetune_config", "configs/synthetic_finetune.py:smoke",
    "Fine-tuning config file (configs/*.py[:arg]); override fields with "
    "--finetune_config.a.b=value.")
_LABEL_FRACTION = flags.DEFINE_float("label_fraction", None,
                                     "Fraction of labelled training subjects (default: the "
                                     "config's data.label_fraction).")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "Split scored besides validation.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Processes sharing the sweep (default: "
                                   "from SLURM/MPI variables, else 1).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", None, "This process's share (default: from "
                                    "SLURM/MPI variables, else 0).")
_MERGE = flags.DEFINE_bool("merge", False, "Only build the table and plot from the results "
                           "present.")
_XLA_CACHE = flags.DEFINE_string("xla_cache_dir", "{out}/xla_cache",
                                 "Persistent compilation cache shared by the fine-tunes "
                                 "(empty: none).")


def main() -> None:
  out = _OUT.value or f"{_PRETRAIN_DIR.value.rstrip('/')}/sweep"
  if _MERGE.value:
    summary = sweep.merge(out)
  else:
    env_index, env_shards = sweep.shard_from_environment()
    num_shards = _NUM_SHARDS.value or env_shards
    shard_index = env_index if _SHARD_INDEX.value is None else _SHARD_INDEX.value
    if _XLA_CACHE.value:
      jax.config.update("jax_compilation_cache_dir", _XLA_CACHE.value.format(out=out))
    summary = sweep.run_sweep(_PRETRAIN_DIR.value, _FINETUNE_CONFIG.value, out,
                              label_fraction=_LABEL_FRACTION.value, test_split=_TEST_SPLIT.value,
                              num_shards=num_shards, shard_index=shard_index)
  print(sweep.markdown(summary))
  logging.info("table and plot in %s", out)


if __name__ == "__main__":
  logs.run(main)
