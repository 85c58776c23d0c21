"""Models: MViT video encoder, BERT-style text encoder, attention-MIL head, dual encoder."""
