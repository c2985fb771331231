"""Checkpoint loading (safetensors, TP shards, FP8), dummy weights and tiny test checkpoints (worker processes, tests)."""
