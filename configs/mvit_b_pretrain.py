r"""Contrastive video-report pre-training at the paper's scale: MViT-B 16x4 against a
PubMedBERT-size text encoder, 16 x 224 x 224 clips, a global batch of 256.

The data are records written by tools/ingest.py (an ingest at 224 px, e.g. `--size=224
--spacing_mm=1.0`, keeps the 224 mm field of view of the default 112 px at 2 mm without
upsampling). The report tokenizer is PubMedBERT's uncased WordPiece vocabulary: its vocab.txt
(30522 tokens) must be given with --config.text.vocab (the default is a placeholder that fails
with a clear message). On a TPU slice or a multi-node GPU job (see launch/):

  python tools/train.py --mode=pretrain --config=configs/mvit_b_pretrain.py \
      --workdir=/shared/runs/mvit_b_pretrain --config.data.dir=/shared/data/ukbb \
      --config.text.vocab=/shared/models/pubmedbert/vocab.txt [--distributed=auto]

Compute is bfloat16 with float32 parameters and optimizer state, every block rematerialised, and
the parameters and AdamW moments sharded over the devices of each host (FSDP, `fsdp=0`; `data`
spans the hosts, and slices over DCN; the batch splits over both, 256 clips = 8 per device on 32
chips). Change the mesh for tensor parallelism, e.g. --config.mesh.model=2, or FSDP over every
device with --config.mesh.data=1 --config.mesh.fsdp=-1.
"""

import ml_collections

PUBMEDBERT_VOCAB_PLACEHOLDER = "/path/to/pubmedbert/vocab.txt"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Pre-training config; takes no argument."""
  if arg not in (None, ""):
    raise ValueError(f"unknown mvit_b_pretrain config argument {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The pre-training archive: studies of subjects that fine-tuning and scoring never use (the
  # paper pre-trained on institutional archives and fine-tuned on UK Biobank). bag_size None:
  # clips drawn from every cine of a study.
  # The host reads one cine per clip and hands it over as stored; the jitted step makes the
  # clip (augment_on_device; README "Input pipeline throughput" gives the host cores it saves).
  c.data = dict(dir="/path/to/archive_records", train_split="train", eval_split="val",
                image_size=224, num_frames=16, bag_size=None, worker_count=8,
                augment_on_device=True, read_threads=8, prefetch_buffer_size=16,
                eval_worker_count=8)
  c.model = dict(video="mvit_b_16x4", text="bert_base", embed_dim=512, dtype="bfloat16",
                 remat=True, two_clips=False, video_overrides={},
                 # The paper's text tower: PubMedBERT's pooled [CLS]; CLIP's temperature start.
                 text_overrides={}, init_temperature=0.07)
  # PubMedBERT's vocabulary; vocab_size only sizes a vocabulary trained when vocab is "".
  c.text = dict(vocab=PUBMEDBERT_VOCAB_PLACEHOLDER, vocab_size=30522, max_len=256,
                max_sentences=None)
  # Converted PyTorch weights for the towers (tools/convert_weights.py): video = Kinetics-400
  # MViT-B, text = a Hugging Face BERT such as PubMedBERT; "" starts from random.
  c.init = dict(video="", text="")
  # Parameter groups kept at their initial values, e.g. ("text_encoder",) for a locked
  # PubMedBERT (LiT-style).
  c.frozen = ()
  c.mesh = dict(data=-1, fsdp=0, model=1)  # FSDP within each host, data over the hosts
  c.batch_size = 256  # global, over all processes
  c.eval_batch_size = 256
  c.total_steps = 30_000  # ~380 epochs of 20k studies
  c.loss = dict(variance_weight=0.0)  # losses.variance_floor weight (see synthetic_pretrain)
  c.optim = dict(lr=1e-4, warmup_steps=1_500, weight_decay=0.05, grad_clip_norm=1.0)
  c.log_every = 50
  c.eval_every = 1_000
  c.checkpoint = dict(every=1_000, keep_last=3, keep_period=5_000, async_save=True)
  return c
