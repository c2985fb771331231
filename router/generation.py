"""From dispatched runs to text: one `ChoiceStream` per choice, merged for n > 1.

Runs in the router process. Each choice is one run (dispatch.py). Its token chunks are
detokenized incrementally (shared.tokenizer's IncrementalDetokenizer: never splits a UTF-8
character, holds back a possible stop-string prefix); on a stop string the run is aborted on
the workers and the choice ends with finish_reason "stop". Latency metrics are taken here.
Invariant: every run this module started is finished or aborted when the generator exits
(also when the client disconnects and the task is cancelled).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from glmserve.router.dispatch import Dispatcher
from glmserve.router.metrics import RouterMetrics
from glmserve.router.runs import Chunk, Failure, Run
from glmserve.router.validate import TextOptions
from glmserve.shared.tokenizer.detokenizer import IncrementalDetokenizer
from glmserve.shared.tokenizer.ids_only import IdsOnlyTokenizer


@dataclass
class Delta:
    """New output of one choice; `finish_reason` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


class ChoiceStream:
    def __init__(self, index: int, run: Run, tokenizer, opts: TextOptions, dispatcher: Dispatcher,
                 metrics: RouterMetrics, t_arrival: float):
        self.index, self.run, self.opts = index, run, opts
        self.dispatcher, self.metrics = dispatcher, metrics
        self.detok = IncrementalDetokenizer(tokenizer, opts.skip_special_tokens, list(opts.stop))
        self.t_arrival = t_arrival
        self.t_last: float | None = None
        self.num_tokens = 0
        self.done = False
        self._held_failure: Failure | None = None  # met while merging; raised by the next call

    def _timing(self) -> None:
        now = time.monotonic()
        if self.t_last is None:
            self.metrics.ttft.observe(now - self.t_arrival)
        else:
            self.metrics.itl.observe(now - self.t_last)
        self.t_last = now

    async def next(self) -> Delta:
        """The next delta; raises the run's APIError on failure. Chunks already queued behind the
        first one are merged into it (as vLLM's output collector merges deltas): a consumer that
        lags (a slow client, or the router itself under load) sends one event for several steps'
        tokens instead of falling further behind. A Failure after merged chunks is kept for the
        next call, so tokens received before an error are still delivered."""
        item = self._held_failure or await self.run.queue.get()
        self._held_failure = None
        if isinstance(item, Failure):
            self.done = True
            raise item.error
        assert isinstance(item, Chunk)
        item = self._merge_queued(item)
        if item.token_ids:
            self._timing()
        self.num_tokens += len(item.token_ids)
        text = self.detok.add(item.token_ids)
        reason = item.finish_reason if item.finished else None
        if self.detok.stopped:
            reason = "stop"
            if self.opts.include_stop_str:
                text += self.detok.stop_str
            if not item.finished:
                self.dispatcher.abort(self.run, "stop string")
        elif item.finished:
            text += self.detok.finish()
        if reason is not None:
            self.done = True
            self.metrics.e2e.observe(time.monotonic() - self.t_arrival)
            self.metrics.output_tokens.inc(self.num_tokens)
        return Delta(self.index, text, item.token_ids, item.logprobs, item.top_logprobs, reason)

    def _merge_queued(self, first: Chunk) -> Chunk:
        """`first` plus every Chunk queued behind it, up to the finishing one or a Failure."""
        queue = self.run.queue
        if first.finished or queue.empty():
            return first
        ids, lps, tops = list(first.token_ids), list(first.logprobs), list(first.top_logprobs)
        last = first
        while not last.finished and not queue.empty():
            nxt = queue.get_nowait()
            if isinstance(nxt, Failure):
                self._held_failure = nxt
                break
            ids += nxt.token_ids
            lps += nxt.logprobs
            tops += nxt.top_logprobs
            last = nxt
        return Chunk(ids, lps, tops, last.finished, last.finish_reason)


def start_choices(dispatcher: Dispatcher, metrics: RouterMetrics, tokenizer, base_rid: str,
                  prompts: list[list[int]], sampling_of, n: int, opts: TextOptions) -> list[ChoiceStream]:
    """Submit n runs per prompt (choice index = prompt * n + i); `sampling_of(i)` gives choice i's params."""
    if opts.stop and isinstance(tokenizer, IdsOnlyTokenizer):
        tokenizer.refuse("stop strings")  # they match text, and ids-only output has none
    t0 = time.monotonic()
    streams: list[ChoiceStream] = []
    try:
        for p, prompt_ids in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                run = dispatcher.submit(f"{base_rid}-{index}", prompt_ids, sampling_of(i))
                streams.append(ChoiceStream(index, run, tokenizer, opts, dispatcher, metrics, t0))
    except BaseException:
        abort_all(streams, "submit failed")
        raise
    metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return streams


def abort_all(streams: list[ChoiceStream], reason: str) -> None:
    for s in streams:
        if not s.done:
            s.dispatcher.abort(s.run, reason)
            s.dispatcher.metrics.aborts.labels(reason).inc()


async def merged(streams: list[ChoiceStream]) -> AsyncIterator[Delta]:
    """Deltas of all choices as they come; aborts every unfinished run on exit (cancel included).
    One choice (the common case) is read directly; several are pumped into one queue by a task each."""
    if len(streams) == 1:
        try:
            while not streams[0].done:
                yield await streams[0].next()
        finally:
            abort_all(streams, "client gone")
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(s: ChoiceStream) -> None:
        try:
            while not s.done:
                await out.put(await s.next())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer below
            await out.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(streams)
        while remaining:
            item = await out.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item
    finally:
        for t in tasks:
            t.cancel()
        abort_all(streams, "client gone")
