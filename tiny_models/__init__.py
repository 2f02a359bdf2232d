"""Tiny, randomly initialised MiniCPM-V checkpoints for tests and demos: see `tiny_models.build`."""
