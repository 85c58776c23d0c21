r"""LVEF fine-tuning on UK Biobank: the pre-trained MViT-B 16x4 frozen, its projection and the
gated-attention MIL head trained with a Huber loss on bags of up to 16 cines per study.

The data are UK Biobank records written by tools/ingest.py (`--layout=ukbb`, LVEF from field
22420; subject-grouped train/val/test splits), at the image size of pre-training. The encoder
comes from a pre-training run (configs/mvit_b_pretrain.py):

  python tools/train.py --mode=finetune --config=configs/ukbb_finetune.py \
      --workdir=/shared/runs/ukbb_finetune --config.data.dir=/shared/data/ukbb \
      --config.init=pretrain:/shared/runs/mvit_b_pretrain [--distributed=auto]

`--config.mode=linear|finetune|transfer` picks what trains (`transfer` also trains the encoder:
lower the learning rate); `--config.init=random` is the from-scratch baseline;
`--config.data.label_fraction=0.1` a data-efficiency run.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """UK Biobank fine-tuning config; takes no argument."""
  if arg not in (None, ""):
    raise ValueError(f"unknown ukbb_finetune config argument {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init = "pretrain:runs/mvit_b_pretrain"  # or "pretrain:WORKDIR:STEP", "random"
  c.mode = "finetune"  # linear | finetune | transfer
  # passes > 0: encoder features of that many augmented passes computed once, the head trained
  # on them (frozen modes only; memory passes * studies * cines * 768 * 4 bytes per host).
  c.feature_cache = dict(passes=0)
  c.data = dict(dir="/path/to/ukbb_records", train_split="train", eval_split="val",
                image_size=224, num_frames=16, max_instances=16, label_fraction=1.0,
                worker_count=8)
  # head "paper": the reference implementation's head (cmr_jax/models/heads.py).
  c.model = dict(video="mvit_b_16x4", embed_dim=512, head="paper", dtype="bfloat16", remat=True,
                 video_overrides={})
  c.mesh = dict(data=1, fsdp=-1, model=1)
  c.batch_size = 32  # studies (bags of up to 16 cines), global
  c.eval_batch_size = 64
  c.total_steps = 20_000
  c.huber_delta = 1.0  # percent LVEF, as the reference implementation
  c.optim = dict(lr=1e-3, warmup_steps=500, weight_decay=1e-4, grad_clip_norm=10.0)
  c.log_every = 50
  c.eval_every = 500
  c.patience = 10  # evaluations without a better validation MAE before stopping
  c.checkpoint = dict(every=500, keep_last=2, async_save=True)
  return c
