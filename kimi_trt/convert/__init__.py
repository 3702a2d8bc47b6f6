"""HF checkpoint -> per-rank checkpoints (and synthetic HF checkpoints for tests)."""
