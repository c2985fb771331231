"""A lagging stream sends one delta for every chunk queued behind it (router/generation.py).

Real `Run` queues and the project's tokenizer; the chunks are what the dispatcher puts there
when token events arrive faster than the endpoint writes them out."""

from __future__ import annotations

import asyncio

import pytest

from glmserve.router.errors import APIError
from glmserve.router.generation import ChoiceStream, merged
from glmserve.router.metrics import RouterMetrics
from glmserve.router.runs import Chunk, Failure, Run
from glmserve.router.validate import TextOptions
from glmserve.shared.protocol import SamplingParams
from glmserve.shared.tokenizer.builtin import write_builtin_tokenizer
from glmserve.shared.tokenizer.glm_tokenizer import load_tokenizer

TEXT = "Hello world, merged chunks stay whole: é ü ß."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    write_builtin_tokenizer(d)
    return load_tokenizer(d)


def _stream(tok, metrics: RouterMetrics) -> ChoiceStream:
    run = Run("r", [1, 2], b"", SamplingParams())
    return ChoiceStream(0, run, tok, TextOptions(), None, metrics, t_arrival=0.0)


def test_queued_chunks_become_one_delta(tok):
    ids = tok.encode(TEXT)
    metrics = RouterMetrics()
    s = _stream(tok, metrics)
    parts = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    for k, p in enumerate(parts):
        last = k == len(parts) - 1
        s.run.queue.put_nowait(Chunk(p, [-0.25] * len(p), [[(t, -0.25)] for t in p], last, "length" if last else None))

    async def read():
        return [d async for d in merged([s])]

    deltas = asyncio.run(read())
    assert len(deltas) == 1 and len(parts) > 3
    d = deltas[0]
    assert d.token_ids == ids and d.text == TEXT and d.finish_reason == "length"
    assert d.logprobs == [-0.25] * len(ids) and [t for t, _ in (x[0] for x in d.top_logprobs)] == ids
    assert s.done and metrics.output_tokens._value.get() == len(ids)


def test_tokens_before_a_failure_are_delivered_then_it_raises(tok):
    ids = tok.encode(TEXT)
    s = _stream(tok, RouterMetrics())
    s.run.queue.put_nowait(Chunk(ids[:4], [], []))
    s.run.queue.put_nowait(Chunk(ids[4:8], [], []))
    s.run.queue.put_nowait(Failure(APIError("worker died", 502)))
    s.run.queue.put_nowait(Chunk(ids[8:], [], [], True, "length"))  # never read: the run failed

    async def read():
        first = await s.next()
        with pytest.raises(APIError, match="worker died"):
            await s.next()
        return first

    first = asyncio.run(read())
    assert first.token_ids == ids[:8] and first.finish_reason is None
    assert tok.decode(ids[:8]).startswith(first.text) and first.text
    assert s.done


def test_chunks_arriving_one_by_one_stay_separate(tok):
    """No lag, no merge: each chunk read before the next arrives is its own delta."""
    ids = tok.encode(TEXT)[:6]
    s = _stream(tok, RouterMetrics())

    async def read():
        out = []
        for k, t in enumerate(ids):
            last = k == len(ids) - 1
            s.run.queue.put_nowait(Chunk([t], [], [], last, "length" if last else None))
            out.append(await s.next())
        return out

    deltas = asyncio.run(read())
    assert [d.token_ids for d in deltas] == [[t] for t in ids]
    assert "".join(d.text for d in deltas) == tok.decode(ids)
