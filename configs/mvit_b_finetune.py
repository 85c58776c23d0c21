r"""LVEF fine-tuning on real records with the pre-trained MViT-B 16x4: the encoder frozen, its
projection and the gated-attention MIL head trained with a Huber loss, on UK Biobank (`:ukbb`, the
default) or the Kaggle Second Annual Data Science Bowl (`:kaggle`). One recipe, two datasets: they
differ only in the table `DATASETS` below.

The data are records written by tools/ingest.py (`--layout=ukbb`: LVEF from field 22420, bags of
up to 16 cines; `--layout=kaggle`: LVEF from the end-diastolic and end-systolic volumes, a SAX
stack with 2- and 4-chamber views, bags of up to 12), subject-grouped train/val/test splits, at the
image size of pre-training. The encoder comes from a pre-training run (configs/mvit_b_pretrain.py):

  python tools/train.py --mode=finetune --config=configs/mvit_b_finetune.py:ukbb \
      --workdir=/shared/runs/ukbb_finetune --config.data.dir=/shared/data/ukbb \
      --config.init=pretrain:/shared/runs/mvit_b_pretrain [--distributed=auto]
  python tools/train.py --mode=finetune --config=configs/mvit_b_finetune.py:kaggle \
      --workdir=runs/kaggle_finetune --config.data.dir=/data/kaggle_records \
      --config.init=pretrain:/shared/runs/mvit_b_pretrain

`--config.mode=linear|finetune|transfer` picks what trains (`transfer` also trains the encoder:
lower the learning rate); `--config.init=random` is the from-scratch baseline;
`--config.data.label_fraction=0.1` a data-efficiency run.
"""

import ml_collections

# What differs between the datasets: bag size, batch and the schedule's length (UK Biobank has
# ~20k training studies, Kaggle ~800, so its run is short and evaluates often).
DATASETS = {
    "ukbb": dict(max_instances=16, batch_size=32, eval_batch_size=64, total_steps=20_000,
                 warmup_steps=500, log_every=50, eval_every=500),
    "kaggle": dict(max_instances=12, batch_size=16, eval_batch_size=32, total_steps=3_000,
                   warmup_steps=150, log_every=10, eval_every=100),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Real-data fine-tuning config; `arg` in {None (= "ukbb"), "ukbb", "kaggle"}."""
  name = arg or "ukbb"
  if name not in DATASETS:
    raise ValueError(f"unknown mvit_b_finetune config argument {arg!r}; expected one of "
                     f"{sorted(DATASETS)}")
  s = DATASETS[name]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init = "pretrain:runs/mvit_b_pretrain"  # or "pretrain:WORKDIR:STEP", "random"
  c.mode = "finetune"  # linear | finetune | transfer
  # passes > 0: encoder features of that many augmented passes computed once, the head trained
  # on them (frozen modes only; memory passes * studies * cines * 768 * 4 bytes per host).
  c.feature_cache = dict(passes=0)
  c.data = dict(dir=f"/path/to/{name}_records", train_split="train", eval_split="val",
                image_size=224, num_frames=16, max_instances=s["max_instances"],
                label_fraction=1.0, worker_count=8, eval_worker_count=8)
  # head "paper": the reference implementation's head (cmr_jax/models/heads.py).
  c.model = dict(video="mvit_b_16x4", embed_dim=512, head="paper", dtype="bfloat16", remat=True,
                 video_overrides={})
  c.mesh = dict(data=-1, fsdp=0, model=1)  # FSDP within each host, data over the hosts
  c.batch_size = s["batch_size"]  # studies (bags of up to max_instances cines), global
  c.eval_batch_size = s["eval_batch_size"]
  c.total_steps = s["total_steps"]
  c.huber_delta = 1.0  # percent LVEF, as the reference implementation
  c.optim = dict(lr=1e-3, warmup_steps=s["warmup_steps"], weight_decay=1e-4, grad_clip_norm=10.0)
  c.log_every = s["log_every"]
  c.eval_every = s["eval_every"]
  c.patience = 10  # evaluations without a better validation MAE before stopping
  c.checkpoint = dict(every=s["eval_every"], keep_last=2, async_save=True)
  return c
