"""Pipeline stages shared by the demo and the benchmark: skipped when done, restarted when stale.

Also the fine-tuning arms both compare, named for what they are (`ARMS`): the pre-trained encoder
frozen (the paper's setting), a random encoder frozen with the same head and budget, the whole
network trained from random initialisation (a supervised baseline), and the pre-trained encoder
with every layer trained (the paper found freezing better than unfreezing).
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import itertools
import json
import os
import time

from absl import logging
import jax
import ml_collections

from cmr_jax.data import preprocess
from cmr_jax.data import records
from cmr_jax.phantom import synthetic
from cmr_jax import runs

XLA_CACHE_DIR = "xla_cache"
TRAIN_MEAN = "train_mean"  # the training-mean predictor's row


@dataclasses.dataclass(frozen=True)
class Arm:
  """One fine-tuning arm.

  Attributes:
    name: its key in results files (and run directory `finetune_{name}`).
    label: what it is, for tables.
    pretrained: the encoder starts from the pre-training run (else from random).
    transfer: every layer trains (the transfer config) instead of the head on a frozen encoder.
  """

  name: str
  label: str
  pretrained: bool
  transfer: bool


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("pretrained", "contrastive pre-trained encoder, frozen (the paper's setting)", True, False),
    Arm("random_frozen", "random encoder, frozen (same head and budget)", False, False),
    Arm("scratch_full", "whole network trained from random init (supervised)", False, True),
    Arm("pretrained_transfer", "contrastive pre-trained encoder, every layer trained", True,
        True),
)}


def arm_config(arm: Arm, frozen: ml_collections.ConfigDict,
               transfer: ml_collections.ConfigDict, data_dir: str,
               pretrain_dir: str) -> ml_collections.ConfigDict:
  """The fine-tuning config of `arm`: a copy of `frozen` or `transfer` on `data_dir`."""
  config = (transfer if arm.transfer else frozen).copy_and_resolve_references()
  if arm.transfer and config.mode != "transfer":
    raise ValueError(f"arm {arm.name} needs a transfer config (mode 'transfer'), got mode "
                     f"{config.mode!r}")
  config.data.dir = data_dir
  config.init = f"pretrain:{pretrain_dir}" if arm.pretrained else "random"
  return config


def use_compilation_cache(workdir: str) -> None:
  """A persistent XLA cache under `workdir`: runs of one model compile each program once."""
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, XLA_CACHE_DIR))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def make_data(config: ml_collections.ConfigDict, out: str) -> None:
  """Builds the dataset unless `out` holds the one `make_data` built from the same config.

  The stamp (`data_stamp`) records the data config and a fingerprint of what was built
  (`dataset_fingerprint`). Another config, or a dataset changed since (rebuilt by another tool,
  a rebuild interrupted), means a rebuild; its new stamp is newer than every run made from the
  old data, so `finished` moves those runs aside (their training subjects may now be in test).
  """
  stamp = data_stamp(out)
  wanted = json.loads(config.to_json(sort_keys=True))
  stored = _read_json(stamp)
  if stored == {"config": wanted, "dataset": dataset_fingerprint(out)}:
    logging.info("dataset %s is up to date", out)
    return
  if stored == wanted:  # a stamp of the config alone (an older version): add the fingerprint
    when = os.path.getmtime(stamp)
    _write_stamp(stamp, wanted, out)
    os.utime(stamp, (when, when))  # the dataset's time is unchanged
    return
  if stored is not None:
    logging.warning("dataset %s was built from another data config or changed since: "
                    "rebuilding it (every stage made from it starts afresh)", out)
    os.remove(stamp)  # an interrupted rebuild must not look complete
  spec = synthetic.SyntheticSpec.from_dict(config.spec.to_dict())
  synthetic.build_synthetic(spec, out, cfg=preprocess.PreprocessConfig.from_dict(
      config.preprocess.to_dict()), num_shards=config.num_shards, num_workers=config.num_workers)
  _write_stamp(stamp, wanted, out)


def data_stamp(data_dir: str) -> str:
  """The file `make_data` writes when a dataset is complete (its time is the dataset's)."""
  return os.path.join(data_dir, "demo_config.json")


def dataset_fingerprint(data_dir: str) -> str | None:
  """SHA-256 of a built dataset's dataset_info.json and split indexes (subjects, labels, order);
  None when it is incomplete."""
  digest = hashlib.sha256()
  try:
    names = [records.DATASET_INFO] + [split + records.INDEX_SUFFIX for split in sorted(
        records.read_dataset_info(data_dir)["splits"])]
    for name in names:
      with open(os.path.join(data_dir, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  except (OSError, ValueError, KeyError):
    return None
  return digest.hexdigest()


def _read_json(path: str):
  """The content of a JSON file; None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_stamp(stamp: str, config: dict, data_dir: str) -> None:
  with open(stamp, "w") as f:
    json.dump({"config": config, "dataset": dataset_fingerprint(data_dir)}, f, indent=1,
              sort_keys=True)


def final_checkpoint(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The directory of a run's final checkpoint (its time is when the run finished)."""
  return os.path.join(workdir, runs.CHECKPOINT_DIR, str(config.total_steps))


def upstream_of(arm: str, data_dir: str, pretrain_dir: str,
                pretrain_config: ml_collections.ConfigDict) -> list[str]:
  """The inputs a fine-tuning run of `arm` (an `ARMS` name or an init string) is made from."""
  inputs = [data_stamp(data_dir)]
  if arm in ARMS and ARMS[arm].pretrained:
    inputs.append(final_checkpoint(pretrain_dir, pretrain_config))
  return inputs


def finished(workdir: str, config: ml_collections.ConfigDict,
             upstream: Sequence[str] = ()) -> bool:
  """Whether a run of `config` in `workdir` already saved its final step (the stage is skipped).

  A run left by another config (e.g. an older version of the demo), or started before any of
  its `upstream` inputs was last written (a dataset rebuilt, a pre-training run redone since:
  `data_stamp`, `final_checkpoint`), is moved aside to `{workdir}.stale-{time}[-n]`, with a
  warning, so that the stage starts afresh instead of resuming from or reusing it.
  """
  saved = os.path.join(workdir, runs.CONFIG_JSON)
  if os.path.exists(saved):
    with open(saved) as f:
      same = json.load(f) == json.loads(config.to_json_best_effort())
    started = os.path.getmtime(saved)
    newer = [p for p in upstream if os.path.exists(p) and os.path.getmtime(p) > started]
    if not same or newer:
      aside = base = f"{workdir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
      for n in itertools.count(1):  # unique: two moves may fall in one second
        if not os.path.exists(aside):
          break
        aside = f"{base}-{n}"
      why = "another config" if not same else f"inputs written since it started ({newer})"
      logging.warning("%s was made with %s: moved to %s; the stage starts afresh", workdir, why,
                      aside)
      os.rename(workdir, aside)
      return False
  return runs.latest_step(workdir) == config.total_steps
