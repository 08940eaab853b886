"""vit-accel: self-supervised ViT pretraining accelerated by token-sequence compression."""
