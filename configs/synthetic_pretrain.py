r"""Contrastive video-report pre-training of the tiny MViT on the synthetic phantom dataset.

  python tools/make_synthetic.py --out=runs/synthetic
  python -m cmr_jax.main --mode=pretrain --config=configs/synthetic_pretrain.py \
      --workdir=runs/pretrain --config.data.dir=runs/synthetic

`:smoke` gives a seconds-long variant for tests. Override anything with --config.a.b=value.
"""

import ml_collections

# mvit_tiny at 32 x 32: key/value pooling stride halved so pooled keys stay 8 x 4 x 4.
TINY_32 = {"image_size": 32, "kv_pool_stride": (1, 2, 2)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Pre-training config; `arg` in {None, "smoke", "benchmark"}."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stored 64 px at 2.75 mm; the tiny demo model sees 16 frames at 32 px (crops resized), so a
  # 2-core CPU pre-trains it in minutes. The real-size configs use 224 px (configs/mvit_b_*.py).
  # Pre-training reads the archive only (subjects never fine-tuned on or scored); its validation
  # slice gives the zero-shot retrieval check.
  c.data = dict(dir="runs/synthetic", train_split="archive", eval_split="archive_val", image_size=32,
                num_frames=16, worker_count=0)
  c.model = dict(video="mvit_tiny", text="bert_tiny", embed_dim=128, dtype="float32",
                 remat=False, two_clips=False, video_overrides=TINY_32,
                 # From scratch, CLIP's start (BERT's pooled [CLS], temperature 0.07) collapses:
                 # a random BERT's [CLS] output is the same for every report (cosine 1.0000
                 # across a batch) and the tiny MViT's embeddings start out correlated (cosine
                 # 0.53 +- 0.31), so shrinking everything to one point is the quickest way down
                 # and InfoNCE sits at ln(batch) with vanishing gradients. The masked mean of
                 # the token states and a start at temperature 0.2 keep both towers spread.
                 text_overrides={"pooling": "mean"}, init_temperature=0.2)
  # The synthetic reports are 36-103 WordPiece tokens long: none is truncated.
  c.text = dict(vocab="", vocab_size=1000, max_len=112, max_sentences=None)
  # Converted PyTorch weights for the towers (tools/convert_weights.py): video = Kinetics-400
  # MViT-B, text = a Hugging Face BERT such as PubMedBERT; "" starts from random.
  c.init = dict(video="", text="")
  c.mesh = dict(data=-1, fsdp=1, model=1)
  c.batch_size = 32
  c.eval_batch_size = 32
  c.total_steps = 200
  # Weight of losses.variance_floor (VICReg's variance term) in the loss; 0: InfoNCE alone. The
  # spreads it measures are logged either way (spread_a, spread_b: ~1 spread, ~0 collapsed): at
  # init the text embeddings' spread is 0.18 and the video's 0.92. On the benchmark data a floor of
  # weight 1 at lr 1e-3 lifted the text spread to 0.9 within 40 steps but did not make InfoNCE
  # learn in 250 steps (the video spread oscillated), so it stays off.
  c.loss = dict(variance_weight=0.0)
  c.optim = dict(lr=3e-4, warmup_steps=30, weight_decay=0.05, grad_clip_norm=1.0)
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint = dict(every=50, keep_last=2, keep_period=100, async_save=True)
  if arg == "smoke":
    c.batch_size = 4
    c.eval_batch_size = 4
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 3
    c.optim.warmup_steps = 2
    c.checkpoint.every = 2
    c.checkpoint.keep_period = None
  elif arg == "benchmark":  # the synthetic benchmark (python -m cmr_jax.benchmark): hours on CPU
    c.total_steps = 3000
    c.eval_every = 500
    c.checkpoint.every = 250
    c.checkpoint.keep_period = 250  # every kept step feeds tools/sweep.py
  elif arg not in (None, ""):
    raise ValueError(f"unknown synthetic_pretrain config argument {arg!r}")
  return c
