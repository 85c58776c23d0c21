r"""Pre-train or fine-tune, driven by an ml_collections config (the trainers' program).

  python tools/train.py --mode=pretrain --config=configs/synthetic_pretrain.py --workdir=runs/pt
  python tools/train.py --mode=finetune --config=configs/synthetic_finetune.py --workdir=runs/ft \
      --config.init=pretrain:runs/pt

Multi-host: `--distributed=auto` joins the processes of a TPU pod or a SLURM job through
`jax.distributed.initialize()` (cluster detection); `--coordinator_address`, `--num_processes` and
`--process_id` set it by hand. Every process runs the same command on shared storage.
A run stopped by a preemption notice (SIGTERM) saves a checkpoint and exits with status 75
(`common.RESUME_EXIT_CODE`); the launch scripts requeue it, and the same command resumes it.

Fine-tuning on a dataset with a `calib` split then calibrates the best checkpoint's prediction
intervals on it (split conformal, as tools/calibrate.py; `--calibrate=false` skips it).
"""

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmr_jax.data import records
from cmr_jax.eval import conformal
from cmr_jax import inference
from cmr_jax import intervals
from cmr_jax import logs
from cmr_jax.train import common
from cmr_jax.train import distributed
from cmr_jax.train import finetune
from cmr_jax.train import pretrain

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py[:arg])")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, logs)")
_MODE = flags.DEFINE_enum("mode", "pretrain", ["pretrain", "finetune"], "what to run")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto", "manual"],
                                 "how to join the processes of a multi-host run")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "this process's GPUs (default: JAX's choice)")
_CALIBRATE = flags.DEFINE_bool("calibrate", True, "After fine-tuning, calibrate the prediction "
                               "intervals on the dataset's calib split, when it has one.")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {"pretrain": pretrain.train_and_evaluate, "finetune": finetune.train_and_evaluate}


def main() -> int | None:
  ids = _LOCAL_DEVICE_IDS.value
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, None if ids is None else [int(i) for i in ids])
  logging.info("process %d of %d, %d devices (%d local): %s", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].device_kind)
  result = TRAINERS[_MODE.value](_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", result)
  if status := common.exit_status(result):  # saved on a preemption notice: to be requeued
    return status
  data_dir = _CONFIG.value.data.dir
  if (_MODE.value == "finetune" and _CALIBRATE.value
      and intervals.CALIB_SPLIT in records.read_dataset_info(data_dir)["splits"]):
    conformal.calibrate(inference.Predictor(_WORKDIR.value), _WORKDIR.value, data_dir)


if __name__ == "__main__":
  logs.run(main)
