r"""LVEF fine-tuning on the synthetic phantom: frozen encoder, trainable projection + attention MIL.

  python -m cmr_jax.main --mode=finetune --config=configs/synthetic_finetune.py \
      --workdir=runs/finetune --config.data.dir=runs/synthetic --config.init=pretrain:runs/pretrain

`--config.init=random` is the from-scratch baseline; `--config.mode=linear|finetune|transfer`;
`--config.data.label_fraction=0.01` for data-efficiency runs. `:smoke` is a seconds-long variant.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fine-tuning config; `arg` in {None, "smoke"}."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init = "random"  # or "pretrain:WORKDIR[:STEP]"
  c.mode = "finetune"  # linear | finetune | transfer
  # Must match the pre-training run's encoder (configs/synthetic_pretrain.py).
  c.data = dict(dir="runs/synthetic", train_split="train", eval_split="val", image_size=32,
                num_frames=16, max_instances=6, label_fraction=1.0, worker_count=0)
  c.model = dict(video="mvit_tiny", embed_dim=128, dtype="float32", remat=False,
                 video_overrides={"image_size": 32, "kv_pool_stride": (1, 2, 2)})
  c.mesh = dict(data=-1, fsdp=1, model=1)
  # The frozen encoder's features of 4 augmented passes over the training bags are computed
  # once and the head trains on them (cmr_jax/train/feature_cache.py): head steps are cheap.
  c.feature_cache = dict(passes=4)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 1000
  c.huber_delta = 5.0  # percent LVEF
  c.optim = dict(lr=3e-3, warmup_steps=20, weight_decay=1e-4, grad_clip_norm=10.0)
  c.log_every = 100
  c.eval_every = 100
  c.patience = 0  # evaluations without val improvement before stopping; 0: never
  c.checkpoint = dict(every=500, keep_last=2, async_save=True)
  if arg == "smoke":
    c.feature_cache.passes = 0
    c.batch_size = 2
    c.eval_batch_size = 4
    c.total_steps = 4
    c.log_every = 1
    c.eval_every = 2
    c.data.max_instances = 4
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
  elif arg not in (None, ""):
    raise ValueError(f"unknown synthetic_finetune config argument {arg!r}")
  return c
