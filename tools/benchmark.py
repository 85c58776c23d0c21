r"""The synthetic benchmark: the paper's claims in shape, on the phantom (every arm at every label
fraction, scored with subject-bootstrap intervals); see cmr_jax/experiments/benchmark.py.

  python tools/benchmark.py --workdir=runs/benchmark
  # a GPU (minutes) or a CPU (about an hour); smaller: --fractions=0.1,1 --arms=pretrained
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from cmr_jax.experiments import benchmark
from cmr_jax.experiments import stages
from cmr_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", "runs/benchmark", "where everything is written")
_DATA = config_flags.DEFINE_config_file("data_config", "configs/synthetic_data.py:benchmark",
                                        "dataset")
_PRETRAIN = config_flags.DEFINE_config_file(
    "pretrain_config", "configs/synthetic_pretrain.py:benchmark", "pre-training")
_FINETUNE = config_flags.DEFINE_config_file("finetune_config", "configs/synthetic_finetune.py",
                                            "fine-tuning with a frozen encoder")
_TRANSFER = config_flags.DEFINE_config_file(
    "transfer_config", "configs/synthetic_finetune.py:transfer",
    "fine-tuning of the whole network (scratch_full, pretrained_transfer)")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.1", "1"], "label fractions")
_ARMS = flags.DEFINE_list("arms", list(stages.ARMS),
                          f"fine-tuning arms {sorted(stages.ARMS)}, or any config.init string "
                          "(encoder frozen)")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "subject-bootstrap replicates")


def main() -> None:
  try:
    fractions = [float(f) for f in _FRACTIONS.value]
  except ValueError as e:
    raise app.UsageError(f"--fractions: {e}") from e
  benchmark.run(_WORKDIR.value, _DATA.value, _PRETRAIN.value, _FINETUNE.value, _TRANSFER.value,
                fractions=fractions, arms=_ARMS.value, bootstrap=_BOOTSTRAP.value)


if __name__ == "__main__":
  logs.run(main)
