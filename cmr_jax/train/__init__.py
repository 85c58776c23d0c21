"""Training: train state, optimizers with freezing, checkpointing, metrics, pre-training and fine-tuning loops."""
