"""Training: one trainer per objective (`pretrain`, `finetune`), train state and resumption,
optimizers with freezing, the metric writer, multi-host start-up."""
