"""The pose-regression network, its checkpoints and inference."""
