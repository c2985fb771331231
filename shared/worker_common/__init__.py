"""What both worker processes (prefill and decode leaders and their TP followers) share:
CLI/config dataclasses, the health/metrics HTTP server, ZeroMQ IO, the TP step fan-out and
the model engine that turns a step plan into a forward pass."""
