r"""Contrastive video-report pre-training of the demo's encoder on the synthetic archive.

  python tools/make_synthetic.py --out=runs/synthetic
  python tools/train.py --mode=pretrain --config=configs/synthetic_pretrain.py \
      --workdir=runs/pretrain --config.data.dir=runs/synthetic

`:smoke` gives a seconds-long variant for tests. Override anything with --config.a.b=value.
"""

import ml_collections

# The CPU demo's towers (README, "Encoders, heads and pre-training"): the small R(2+1)D video
# encoder and a bag-of-words text encoder; the real-size config is configs/mvit_b_pretrain.py
# (MViT-B and BERT-base).
VIDEO = "r2plus1d_tiny"
IMAGE_SIZE = 48  # clip side the encoder sees (data.image_size and the encoder's image_size)
VIDEO_OVERRIDES = {"image_size": IMAGE_SIZE}
TEXT = "bow_tiny"
# The variants: overrides of the default config (dotted keys).
SMOKE = {"batch_size": 4, "eval_batch_size": 4, "total_steps": 6, "log_every": 1,
         "eval_every": 3, "optim.warmup_steps": 2, "checkpoint.every": 2,
         "checkpoint.keep_period": None}
# The synthetic benchmark (python tools/benchmark.py): ~32 passes over its ~2000-study archive,
# every kept step feeding tools/sweep.py.
BENCHMARK = {"total_steps": 2000, "eval_every": 500, "checkpoint.every": 250,
             "checkpoint.keep_period": 250}
VARIANTS = {None: {}, "": {}, "smoke": SMOKE, "benchmark": BENCHMARK}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Pre-training config; `arg` in {None, "smoke", "benchmark"}."""
  if arg not in VARIANTS:
    raise ValueError(f"unknown synthetic_pretrain config argument {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stored 64 px at 2.75 mm; the demo's encoder sees 16 frames at 48 px (crops resized), so a
  # 2-core CPU pre-trains it in minutes (at 32 px, in half the time, the SAX slices' cavity was
  # ~10 px across and read worse: README, "Encoders, heads and pre-training"). Pre-training
  # reads the archive only (subjects never fine-tuned on or scored); its validation slice gives
  # the zero-shot retrieval check. Clips come from each study's fine-tuning bag of 6 (long-axis
  # views and every second SAX slice).
  # Train clips are made on the host here (augment_on_device=False): the README's demo figures
  # were measured so, and a device clip differs from the host's by a grey level in ~0.1% of
  # pixels (cmr_jax/data/device_augment.py), which moves every trained figure.
  c.data = dict(dir="runs/synthetic", train_split="archive", eval_split="archive_val",
                image_size=IMAGE_SIZE, num_frames=16, bag_size=6, worker_count=0,
                augment_on_device=False, read_threads=2, prefetch_buffer_size=4,
                eval_worker_count=0)
  c.model = dict(video=VIDEO, text=TEXT, embed_dim=128, dtype="float32", remat=False,
                 two_clips=False, video_overrides=VIDEO_OVERRIDES, text_overrides={},
                 init_temperature=0.2)
  # The synthetic reports are 36-103 WordPiece tokens long: none is truncated.
  c.text = dict(vocab="", vocab_size=1000, max_len=112, max_sentences=None)
  # Converted PyTorch weights for the towers (tools/convert_weights.py): video = Kinetics-400
  # MViT-B, text = a Hugging Face BERT such as PubMedBERT; "" starts from random.
  c.init = dict(video="", text="")
  # Parameter groups kept at their initial values (no optimizer state). The random bag-of-words
  # tower is locked (LiT-style; text_proj still trains): trained, it drifted towards a constant
  # and InfoNCE stayed at ln 32 for 400 steps; locked, it fell to 2.9 in 800 (README).
  c.frozen = ("text_encoder",)
  c.mesh = dict(data=-1, fsdp=1, model=1)
  c.batch_size = 32
  c.eval_batch_size = 32
  c.total_steps = 800
  # Weight of losses.variance_floor (VICReg's variance term) in the loss; 0: InfoNCE alone. The
  # spreads it measures are logged either way (spread_a, spread_b: ~1 spread, ~0 collapsed). With
  # the towers trained, weight 1 held both spreads at ~0.97 but InfoNCE stayed >= 3.44 for 200
  # steps, so it stays off.
  c.loss = dict(variance_weight=0.0)
  c.optim = dict(lr=1e-3, warmup_steps=50, weight_decay=0.05, grad_clip_norm=1.0)
  c.log_every = 10
  c.eval_every = 200
  c.checkpoint = dict(every=100, keep_last=2, keep_period=200, async_save=True)
  c.update_from_flattened_dict(VARIANTS[arg])
  return c
