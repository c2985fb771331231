"""The GLM-4.x MoE models over a flat batch and a paged KV cache (worker processes). See README.md here."""
