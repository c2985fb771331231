"""Last-line request checks in the worker leaders (prefill and decode).

The router validates every request first; these checks only make sure a request that slipped
through can never crash a worker's step (an out-of-vocab id would fail the embedding lookup for
the whole batch). A failing request gets a RequestError; the worker goes on.
"""

from __future__ import annotations

from glmserve.shared import protocol as P


def check_request(prompt: list[int], sampling: P.SamplingParams, max_seq_len: int, vocab_size: int) -> str | None:
    """Why a request can never run here (the router validates first; workers never crash on it)."""
    if not prompt:
        return "empty prompt"
    if sampling.max_new_tokens < 1:
        return "max_new_tokens must be >= 1"
    if len(prompt) + sampling.max_new_tokens > max_seq_len:
        return f"prompt ({len(prompt)}) + max_new_tokens ({sampling.max_new_tokens}) > {max_seq_len} positions"
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        return f"token id out of range [0, {vocab_size})"
    if sampling.top_k > vocab_size:
        return f"top_k {sampling.top_k} > vocab size {vocab_size}"
    if any(t >= vocab_size for t in sampling.stop_token_ids):
        return f"stop token id out of range [0, {vocab_size})"
    return None
