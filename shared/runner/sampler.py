"""Token sampler: logits -> next tokens, pure torch (prefill and decode workers, every TP rank alike).

For each row b of logits z [B, V] (fp32), in this order (vLLM's order):

1. Repetition penalty r (HF/vLLM semantics, over prompt + output tokens): for every token id v seen
   in token_history[b], z_v <- z_v / r if z_v > 0 else z_v * r.
2. Frequency f and presence p penalties (OpenAI semantics, over output tokens only, i.e.
   token_history[b][output_starts[b]:]): z_v <- z_v - f * count_v - p * [count_v > 0].
3. Temperature T: z <- z / T (T = 0 means greedy and skips this step).
   The log-softmax of z after steps 1-3 is the "processed distribution": `logprobs` (the chosen
   token's) and `top_logprobs` are read from it, before any truncation, so they are always finite.
4. Truncation, as probabilities P = softmax(z): min_p keeps v with P_v >= min_p * max(P); then top_k
   keeps the k largest; then top_p keeps the smallest prefix of the descending order whose mass
   reaches top_p (the top token is always kept). Dropped logits become -inf.
5. Choice: greedy rows take argmax of z (after 1-2); other rows take argmax_v P'_v / E_v with
   E_v ~ Exp(1) i.i.d. (the exponential race: an exact draw from P' = renormalised truncated P).
   A row with a seed draws its E from its own torch.Generator, V numbers per step, so the same seed
   gives the same tokens whatever else is in the batch; unseeded rows share one batched draw.

`sampling_probs(...)` returns P' (the truncated distribution actually sampled from), which the
speculative verifier needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from glmserve.shared.protocol import SamplingParams

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters of one batch, on the logits' device. All tensors are [B]."""

    temperature: torch.Tensor  # fp32; 0 = greedy
    top_k: torch.Tensor  # int64; values <= 0 mean off
    top_p: torch.Tensor  # fp32
    min_p: torch.Tensor  # fp32
    repetition_penalty: torch.Tensor  # fp32
    frequency_penalty: torch.Tensor  # fp32
    presence_penalty: torch.Tensor  # fp32
    seeds: tuple[int | None, ...]
    max_top_logprobs: int  # largest top_logprobs over rows (0 = none wanted)
    all_greedy: bool
    any_truncation: bool  # some row has top_k, top_p < 1 or min_p > 0
    any_rep_penalty: bool
    any_freq_presence: bool

    @staticmethod
    def from_params(params: list[SamplingParams], device: torch.device | str = "cpu") -> "SamplingTensors":
        """On CUDA the rows' values go over from pinned memory without blocking the host (the decode
        worker builds these while the previous step still runs)."""
        def f32(vals: list[float]) -> torch.Tensor:
            return host_to_device(torch.tensor(vals, dtype=torch.float32), device)

        temps = [max(float(p.temperature), 0.0) for p in params]
        top_k = [int(p.top_k) for p in params]
        top_p = [float(p.top_p) for p in params]
        min_p = [float(p.min_p) for p in params]
        rep = [float(p.repetition_penalty) for p in params]
        freq = [float(p.frequency_penalty) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        sampled = [t > 0 for t in temps]
        return SamplingTensors(
            temperature=f32(temps),
            top_k=host_to_device(torch.tensor(top_k, dtype=torch.int64), device),
            top_p=f32(top_p),
            min_p=f32(min_p),
            repetition_penalty=f32(rep),
            frequency_penalty=f32(freq),
            presence_penalty=f32(pres),
            seeds=tuple(p.seed for p in params),
            max_top_logprobs=max((int(p.top_logprobs) if p.logprobs else 0 for p in params), default=0),
            all_greedy=not any(sampled),
            any_truncation=any(
                s and (k > 0 or tp < 1.0 or mp > 0.0) for s, k, tp, mp in zip(sampled, top_k, top_p, min_p)
            ),
            any_rep_penalty=any(r != 1.0 for r in rep),
            any_freq_presence=any(f != 0.0 or p != 0.0 for f, p in zip(freq, pres)),
        )


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (a host tensor) on `device`. CUDA: through pinned memory, non-blocking: a pageable copy
    would wait for every kernel already queued on the stream, i.e. sync the host with the GPU. The
    caching host allocator keeps the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, of the chosen token under the processed distribution
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (ids [B, k] int64, logprobs [B, k] fp32)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator a worker keeps for a seeded request for its whole life. Keep it on
    the CPU (the default) whatever the logits' device: draws are then device-independent."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _token_counts(history: list[list[int]], starts: list[int], vocab: int, device) -> torch.Tensor:
    """[B, V] fp32 counts of history[b][starts[b]:] per token id."""
    counts = torch.zeros(len(history), vocab, dtype=torch.float32, device=device)
    ids = list(itertools.chain.from_iterable(h[s:] for h, s in zip(history, starts)))
    if ids:
        lens = torch.tensor([max(0, len(h) - s) for h, s in zip(history, starts)])
        r = torch.repeat_interleave(torch.arange(len(history)), lens).to(device)
        c = torch.tensor(ids, dtype=torch.int64).to(device)
        counts.index_put_((r, c), torch.ones_like(r, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor, t: SamplingTensors, history: list[list[int]], output_starts: list[int] | None
) -> torch.Tensor:
    """Steps 1-2 of the module docstring; returns a new [B, V] tensor."""
    z = logits.float().clone()
    vocab = z.shape[1]
    if t.any_rep_penalty:
        seen = _token_counts(history, [0] * len(history), vocab, z.device) > 0
        r = t.repetition_penalty[:, None]
        z = torch.where(seen, torch.where(z > 0, z / r, z * r), z)
    if t.any_freq_presence:
        starts = output_starts if output_starts is not None else [0] * len(history)
        counts = _token_counts(history, starts, vocab, z.device)
        z = z - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0).float()
    return z


def _truncate(z: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Step 4 on temperature-scaled logits z [B, V]; returns logits with dropped entries at -inf."""
    probs = z.softmax(-1)
    keep_min_p = probs >= t.min_p[:, None] * probs.amax(-1, keepdim=True)
    z = z.masked_fill(~keep_min_p, _NEG_INF)
    sorted_z, order = z.sort(-1, descending=True)
    rank = torch.arange(z.shape[1], device=z.device)[None, :]
    k = torch.where(t.top_k > 0, t.top_k, z.shape[1])[:, None]
    sorted_z = sorted_z.masked_fill(rank >= k, _NEG_INF)
    sorted_p = sorted_z.softmax(-1)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly better tokens
    sorted_z = sorted_z.masked_fill((mass_before >= t.top_p[:, None]) & (rank > 0), _NEG_INF)
    return torch.full_like(z, _NEG_INF).scatter(1, order, sorted_z)


def _processed(logits, t, history, output_starts) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalised logits [B, V], processed logits = penalised / T with T=0 read as 1)."""
    z = apply_penalties(logits, t, history, output_starts)
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    return z, z / temp[:, None]


def _exponentials(shape, seeds, generators, device) -> torch.Tensor:
    """[B, V] Exp(1) noise; seeded rows use their own generator (V draws each), drawn on the
    generator's device (CPU by default) and copied over, so a seed gives the same tokens on CPU and GPU."""
    e = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for b, seed in enumerate(seeds):
        g = generators[b] if generators is not None else None
        if g is None and seed is not None:
            g = make_generator(seed)
        if g is not None:
            draw = torch.empty(shape[1], dtype=torch.float32, device=g.device).exponential_(generator=g)
            e[b].copy_(draw)
    return e


def sample(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    token_history: list[list[int]],
    generators: list[torch.Generator | None] | None = None,
    output_starts: list[int] | None = None,
) -> SampleOutput:
    """Sample one token per row (see the module docstring for the math).

    logits: [B, V] fp32. token_history[b]: prompt + output ids of row b. generators[b]: the row's
    generator (from `make_generator(seed)`, kept by the worker across steps) or None; a seeded row
    with no generator given gets a fresh one from its seed. output_starts[b]: index in
    token_history[b] where output begins (the prompt length); None reads the whole history as output.
    """
    assert logits.dim() == 2 and logits.shape[0] == tensors.temperature.shape[0], "logits must be [B, V]"
    z, scaled = _processed(logits, tensors, token_history, output_starts)
    logp = scaled.log_softmax(-1)
    greedy_ids = z.argmax(-1)
    if tensors.all_greedy:
        ids = greedy_ids
    else:
        trunc = _truncate(scaled, tensors) if tensors.any_truncation else scaled
        probs = trunc.softmax(-1)
        noise = _exponentials(probs.shape, tensors.seeds, generators, probs.device)
        sampled_ids = (probs / noise).argmax(-1)
        ids = torch.where(tensors.temperature > 0, sampled_ids, greedy_ids)
    chosen = logp.gather(1, ids[:, None]).squeeze(1)
    top = None
    if tensors.max_top_logprobs > 0:
        vals, top_ids = logp.topk(min(tensors.max_top_logprobs, logp.shape[1]), dim=-1)
        top = (top_ids, vals)
    return SampleOutput(token_ids=ids, logprobs=chosen, top_logprobs=top)


def sampling_probs(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    token_history: list[list[int]],
    output_starts: list[int] | None = None,
) -> torch.Tensor:
    """P' [B, V]: the distribution `sample` draws from (one-hot argmax for greedy rows)."""
    z, scaled = _processed(logits, tensors, token_history, output_starts)
    trunc = _truncate(scaled, tensors) if tensors.any_truncation else scaled
    probs = trunc.softmax(-1)
    onehot = torch.zeros_like(probs).scatter_(1, z.argmax(-1, keepdim=True), 1.0)
    return torch.where((tensors.temperature > 0)[:, None], probs, onehot)
