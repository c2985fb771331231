"""The `random` and `prefix` datasets (benchmark client process).

random: input/output lengths fixed or drawn uniformly from [len*(1-range_ratio), len*(1+range_ratio)],
prompts of random token ids (sent as ids to /v1/completions, decoded to text for chat), no two
prompts share a prefix (each starts at a distinct offset of the vocabulary).
prefix: `num_prefixes` shared prefixes of `prefix_len` tokens, each request one of them plus its own
random suffix of `input_len` tokens (what a prefix cache would reuse).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.sharegpt.datasets import SampleRequest
from bench.sharegpt.text import TokenCounter

# Token ids drawn when no tokenizer gives a vocab size: clear of the usual special-token range.
DEFAULT_VOCAB = 250


@dataclass(frozen=True)
class RandomSpec:
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1


def _length(rng: random.Random, center: int, ratio: float) -> int:
    lo, hi = int(center * (1 - ratio)), int(center * (1 + ratio))
    return max(1, rng.randint(lo, hi) if hi > lo else center)


def _ids(rng: random.Random, n: int, vocab: int, offset: int) -> list[int]:
    # Consecutive ids from a distinct offset per request: no accidental shared prefix.
    low = 8  # leave low ids (pad / eos / bos in small vocabularies) alone
    span = max(vocab - low, 1)
    return [low + (offset + i * 7 + rng.randrange(3)) % span for i in range(n)]


def _request(counter: TokenCounter, ids: list[int], output_len: int) -> SampleRequest:
    return SampleRequest(counter.decode(ids), len(ids), output_len, tuple(ids))


def random_requests(num_requests: int, spec: RandomSpec, counter: TokenCounter, seed: int) -> list[SampleRequest]:
    rng = random.Random(seed)
    vocab = counter.vocab_size() or DEFAULT_VOCAB
    out = []
    for i in range(num_requests):
        ids = _ids(rng, _length(rng, spec.input_len, spec.range_ratio), vocab, offset=rng.randrange(vocab) + i)
        out.append(_request(counter, ids, _length(rng, spec.output_len, spec.range_ratio)))
    return out


def prefix_requests(num_requests: int, spec: RandomSpec, counter: TokenCounter, seed: int) -> list[SampleRequest]:
    rng = random.Random(seed)
    vocab = counter.vocab_size() or DEFAULT_VOCAB
    prefixes = [_ids(rng, spec.prefix_len, vocab, offset=rng.randrange(vocab)) for _ in range(max(spec.num_prefixes, 1))]
    out = []
    for i in range(num_requests):
        suffix = _ids(rng, _length(rng, spec.input_len, spec.range_ratio), vocab, offset=rng.randrange(vocab))
        out.append(_request(counter, prefixes[i % len(prefixes)] + suffix, _length(rng, spec.output_len, spec.range_ratio)))
    return out
