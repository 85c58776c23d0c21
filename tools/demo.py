r"""The main job on the embedded synthetic default (what `make demo` runs): data, pre-training,
fine-tuning of every arm, evaluation; see cmr_jax/experiments/demo.py.

  python tools/demo.py --workdir=runs/demo
"""

from absl import flags
from ml_collections import config_flags

from cmr_jax.experiments import demo
from cmr_jax import logs

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything is written")
_DATA = config_flags.DEFINE_config_file("data_config", "configs/synthetic_data.py", "dataset")
_PRETRAIN = config_flags.DEFINE_config_file("pretrain_config", "configs/synthetic_pretrain.py",
                                            "pre-training")
_FROZEN = config_flags.DEFINE_config_file("finetune_config", "configs/synthetic_finetune.py",
                                          "fine-tuning, frozen encoder")
_TRANSFER = config_flags.DEFINE_config_file(
    "transfer_config", "configs/synthetic_finetune.py:transfer",
    "fine-tuning of the whole network (the scratch_full arm)")


def main() -> None:
  demo.run(_WORKDIR.value, _DATA.value, _PRETRAIN.value, _FROZEN.value, _TRANSFER.value)


if __name__ == "__main__":
  logs.run(main)
