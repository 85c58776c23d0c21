r"""Converts published PyTorch weights into a checkpoint folder that our models load.

Inputs: pytorchvideo's Kinetics-400 MViT-B (`MVIT_B_16x4.pyth`, `MVIT_B_32x3_f294077834.pyth`),
torchvision's `mvit_v1_b` state dict, the paper's cmr_transformer Lightning checkpoint (`.ckpt`,
keys under `model.`), or a Hugging Face BERT folder (config.json, model.safetensors or
pytorch_model.bin, vocab.txt; e.g. PubMedBERT) for the text tower. The layout is recognised from
the tensor names (or given with --layout). Output: a folder with the parameters (orbax),
conversion.json (configs, source hash, report) and, for a text tower, its vocab.txt; see
`cmr_jax.convert.converted`.

  python -m tools.convert_weights --src=MVIT_B_16x4.pyth --out=weights/kinetics_mvit_b_16x4
  python -m tools.convert_weights --src=cmr_pretrained.ckpt --out=weights/cmr_transformer \
      --vocab=pubmedbert/vocab.txt
  python -m tools.convert_weights --src=pubmedbert/ --out=weights/pubmedbert

The tensors fix the widths, depth, heads per block and (from the position embeddings) the clip
length and size; what they cannot show (key/value pooling strides, LayerNorm eps, dropout) comes
from --video_config / --text_config and is recorded in conversion.json.

Fine-tuning then starts from it with `--config.init=kinetics:weights/kinetics_mvit_b_16x4` (the
encoder) or `--config.init=cmr_transformer:weights/cmr_transformer` (encoder and `video_proj`).

Every model parameter must come from the file with its exact shape, and every tensor in the file
must have a place in the model (a Kinetics classifier head, index buffers and the projections'
biases are known and dropped, and listed). Otherwise the tool lists the offending names and stops;
--allow_missing / --allow_mismatch keep a fresh initialisation for those parameters and
--allow_unexpected ignores extra tensors.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from absl import logging

from cmr_jax.convert import converted as converted_lib
from cmr_jax.convert import mapping
from cmr_jax import logs
from cmr_jax.models import registry

_SRC = flags.DEFINE_string("src", None, "PyTorch weight file or Hugging Face model folder",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (must be empty or absent)", required=True)
_LAYOUT = flags.DEFINE_enum("layout", "auto", ["auto", *converted_lib.LAYOUTS],
                            "state dict layout; auto recognises it by its names")
_VIDEO_CONFIG = flags.DEFINE_enum(
    "video_config", converted_lib.DEFAULT_VIDEO_CONFIG, sorted(registry.VIDEO_CONFIGS),
    "MViT geometry of the weights (frames and size are read off the position embeddings)")
_TEXT_CONFIG = flags.DEFINE_enum(
    "text_config", converted_lib.DEFAULT_TEXT_CONFIG, sorted(registry.TEXT_CONFIGS),
    "BERT geometry when the source has no config.json (sizes are read off the tensors; the "
    "head count comes from here)")
_VOCAB = flags.DEFINE_string("vocab", None,
                             "vocab.txt of the text tower (default: the model folder's own)")
_ALLOW_MISSING = flags.DEFINE_bool("allow_missing", False,
                                   "initialise parameters the file lacks instead of stopping")
_ALLOW_UNEXPECTED = flags.DEFINE_bool("allow_unexpected", False,
                                      "ignore tensors with no place in the model")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_mismatch", False,
                                    "initialise parameters whose tensor has another shape")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation seed for allowed missing parameters")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")


def main() -> None:
  try:
    result = converted_lib.convert_file(
        _SRC.value, layout=_LAYOUT.value, video_config=registry.video_config(_VIDEO_CONFIG.value),
        text_config=registry.text_config(_TEXT_CONFIG.value), vocab=_VOCAB.value,
        allow_missing=_ALLOW_MISSING.value, allow_unexpected=_ALLOW_UNEXPECTED.value,
        allow_mismatch=_ALLOW_MISMATCH.value, seed=_SEED.value)
  except mapping.ConversionError as e:
    logging.error("full report:\n%s", json.dumps(e.report.to_json(), indent=1))
    sys.exit(f"error: {e}")
  report = result.report
  by_reason: dict[str, int] = {}
  for reason in report.dropped.values():
    by_reason[reason] = by_reason.get(reason, 0) + 1
  for reason, count in sorted(by_reason.items()):
    logging.info("dropped %d tensors: %s", count, reason)
  for kind in ("missing", "unexpected", "mismatched"):
    if getattr(report, kind):
      logging.warning("%s (allowed): %s", kind, getattr(report, kind))
  out = converted_lib.save_converted(_OUT.value, result, overwrite=_OVERWRITE.value)
  logging.info("%s layout: %d parameters in groups %s", report.layout, len(report.converted),
               sorted(result.params))
  if result.video_config:
    logging.info("video encoder: %s", result.video_config)
  if result.text_config:
    logging.info("text encoder: %s (vocabulary: %s)", result.text_config, result.vocab)
  print(out)


if __name__ == "__main__":
  logs.run(main)
