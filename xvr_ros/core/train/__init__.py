"""Self-supervised training: pose presets, augmentations, the training loop."""
