"""ShareGPT requests: the real file with vLLM's filters, or a synthetic ShareGPT-shaped set (benchmark client).

File format (`ShareGPT_V3_unfiltered_cleaned_split.json`): a JSON list of
`{"id", "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`. The prompt is the first
human turn, the output length is the token count of the model turn that follows it. Items are
shuffled with the seed, then filtered as `vllm bench serve` does: drop prompt or output under
`min_len` (4) tokens, prompts over `max_prompt_len` (1024), prompt + output over `max_total_len` (2048).

The synthetic set draws prompt and output lengths from log-normal distributions whose means are
the published ShareGPT means (vLLM paper, see bench/README.md) and runs them through the same filter.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from bench.sharegpt.text import TokenCounter

# Published ShareGPT means (Kwon et al., SOSP'23 "PagedAttention", Fig. 11a; tokens).
SHAREGPT_MEAN_INPUT_LEN = 161.31
SHAREGPT_MEAN_OUTPUT_LEN = 337.99
# Log-normal spreads: our assumption (the paper shows long right tails, not their sigma).
SHAREGPT_SIGMA_INPUT = 1.0
SHAREGPT_SIGMA_OUTPUT = 0.9


@dataclass(frozen=True)
class SampleRequest:
    """One request to send. `prompt_ids` is set when the prompt was built as token ids."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LengthFilter:
    """vLLM's ShareGPT filter; every bound configurable (`--sharegpt-*` flags)."""

    min_len: int = 4
    max_prompt_len: int = 1024
    max_total_len: int = 2048

    def keep(self, prompt_len: int, output_len: int, fixed_output: bool = False) -> bool:
        if prompt_len < self.min_len or (not fixed_output and output_len < self.min_len):
            return False
        return prompt_len <= self.max_prompt_len and prompt_len + output_len <= self.max_total_len


def _pairs(items: list[dict]) -> list[tuple[str, str]]:
    """(first human turn, the model turn after it) of every item with at least 2 turns."""
    pairs = []
    for item in items:
        turns = item.get("conversations") or []
        if len(turns) < 2:
            continue
        for i in range(len(turns) - 1):
            if turns[i].get("from") == "human" and turns[i + 1].get("from") != "human":
                pairs.append((str(turns[i]["value"]), str(turns[i + 1]["value"])))
                break
    return pairs


def load_sharegpt(
    path: str, num_requests: int, counter: TokenCounter, seed: int,
    flt: LengthFilter = LengthFilter(), fixed_output_len: int | None = None,
) -> list[SampleRequest]:
    """The first `num_requests` items of the shuffled file that pass the filter."""
    with open(path, encoding="utf-8") as f:
        pairs = _pairs(json.load(f))
    random.Random(seed).shuffle(pairs)
    out: list[SampleRequest] = []
    for prompt, completion in pairs:
        if len(out) == num_requests:
            break
        prompt_len = counter.count(prompt)
        output_len = fixed_output_len or counter.count(completion)
        if flt.keep(prompt_len, output_len, fixed_output_len is not None):
            out.append(SampleRequest(prompt, prompt_len, output_len))
    return out


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
    return max(1, int(round(rng.lognormvariate(mu, sigma))))


def synthetic_sharegpt(
    num_requests: int, counter: TokenCounter, seed: int,
    flt: LengthFilter = LengthFilter(), fixed_output_len: int | None = None,
) -> list[SampleRequest]:
    """Deterministic ShareGPT-shaped requests (same seed and counter -> same list)."""
    rng = random.Random(seed)
    out: list[SampleRequest] = []
    while len(out) < num_requests:
        prompt_len = _lognormal(rng, SHAREGPT_MEAN_INPUT_LEN, SHAREGPT_SIGMA_INPUT)
        output_len = fixed_output_len or _lognormal(rng, SHAREGPT_MEAN_OUTPUT_LEN, SHAREGPT_SIGMA_OUTPUT)
        if not flt.keep(prompt_len, output_len, fixed_output_len is not None):
            continue
        text = counter.text_of(rng, prompt_len)
        out.append(SampleRequest(text, counter.count(text), output_len))
    return out
