"""Training: the one loop (pretraining now; supervised fine-tuning and distillation reuse it)."""
