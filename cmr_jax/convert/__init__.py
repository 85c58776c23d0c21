"""Import of published PyTorch weights into our Flax parameter trees.

  torch_io     reads state dicts: pytorchvideo/SlowFast `.pyth`, `.pt`/`.pth`/`.bin`, PyTorch
               Lightning `.ckpt`, safetensors, Hugging Face model folders.
  mapping      renames a state dict onto a parameter tree and reports missing, unexpected and
               mis-shaped tensors by name.
  mvit         pytorchvideo (`mvit_base_16x4`, `mvit_base_32x3`), torchvision (`mvit_v1_b`) and
               cmr_transformer (`model.video_encoder`, `model.video_proj`) names.
  bert         Hugging Face `BertModel` names and config.
  converted    the converted checkpoint folder (orbax parameters + conversion.json [+ vocab.txt])
               and the loader behind fine-tuning's `init=kinetics:PATH` / `cmr_transformer:PATH`.
"""
