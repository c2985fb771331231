"""Model layers shared by both GLM architectures (each worker rank)."""
