r"""LVEF fine-tuning on the synthetic phantom: frozen encoder, trainable projection + paper head.

  python tools/train.py --mode=finetune --config=configs/synthetic_finetune.py \
      --workdir=runs/finetune --config.data.dir=runs/synthetic --config.init=pretrain:runs/pretrain

`--config.init=random` with the encoder frozen is the `random_frozen` baseline;
`:transfer` trains the whole network (`scratch_full` from `--config.init=random`,
`pretrained_transfer` from a pre-training run); `--config.data.label_fraction=0.01` for
data-efficiency runs. `:smoke` is a seconds-long variant.
"""

import ml_collections

# Must match the pre-training run's encoder (configs/synthetic_pretrain.py).
VIDEO = "r2plus1d_tiny"
IMAGE_SIZE = 48  # clip side the encoder sees (data.image_size and the encoder's image_size)
VIDEO_OVERRIDES = {"image_size": IMAGE_SIZE}
# The variants: overrides of the default config (dotted keys). `transfer`: every layer trains,
# end to end on the augmented bags (no feature cache), a budget of the same wall-clock class as
# pre-training plus the frozen arm's fine-tuning on the 2-core CPU.
TRANSFER = {"mode": "transfer", "feature_cache.passes": 0, "total_steps": 300,
            "optim.lr": 2e-3, "optim.warmup_steps": 30, "log_every": 50, "eval_every": 100,
            "checkpoint.every": 100}
SMOKE = {"feature_cache.passes": 0, "batch_size": 2, "eval_batch_size": 4, "total_steps": 4,
         "log_every": 1, "eval_every": 2, "data.max_instances": 4, "optim.warmup_steps": 1,
         "checkpoint.every": 2}
VARIANTS = {None: {}, "": {}, "transfer": TRANSFER, "smoke": SMOKE,
            "transfer_smoke": {**TRANSFER, **SMOKE}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fine-tuning config; `arg` in {None, "transfer", "smoke", "transfer_smoke"}."""
  if arg not in VARIANTS:
    raise ValueError(f"unknown synthetic_finetune config argument {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init = "random"  # or "pretrain:WORKDIR[:STEP]"
  c.mode = "finetune"  # linear | finetune | transfer
  c.data = dict(dir="runs/synthetic", train_split="train", eval_split="val",
                image_size=IMAGE_SIZE, num_frames=16, max_instances=6, label_fraction=1.0,
                worker_count=0, eval_worker_count=0)
  c.model = dict(video=VIDEO, embed_dim=128, head="paper", dtype="float32", remat=False,
                 video_overrides=VIDEO_OVERRIDES)
  c.mesh = dict(data=-1, fsdp=1, model=1)
  # The frozen encoder's features of 8 augmented passes over the training bags are computed
  # once and the head trains on them (cmr_jax/train/feature_cache.py): head steps are cheap.
  c.feature_cache = dict(passes=8)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 2000
  c.huber_delta = 1.0  # percent LVEF, as the reference implementation
  c.optim = dict(lr=1e-3, warmup_steps=50, weight_decay=1e-4, grad_clip_norm=10.0)
  c.log_every = 100
  c.eval_every = 100
  c.patience = 0  # evaluations without val improvement before stopping; 0: never
  c.checkpoint = dict(every=500, keep_last=2, async_save=True)
  c.update_from_flattened_dict(VARIANTS[arg])
  return c
