"""Offline generation: the single-process reference the fleet is compared with, and a user tool.

    python -m glmserve.shared.generate --model_dir DIR --prompt_ids_json '[[1,2,3],[4,5]]' --max_new_tokens N
        [--temperature T] [--seed S] [--ignore_eos] [--tp N] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--load-format dummy] [--quantization fp8] [--prompt TEXT]

Prints one JSON object {"outputs": [{"token_ids": [...], "logprobs": [...]}, ...]}, one entry per prompt
(logprob of each chosen token under the sampler's processed distribution; raw log-softmax when greedy).
All prompts are prefilled in one batch, then decoded together; a sequence stops at an EOS id of the
config (unless --ignore_eos) or after max_new_tokens. --tp N spawns N processes (gloo on CPU, NCCL on
CUDA); rank 0 samples and broadcasts the tokens so every rank runs the same steps, and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.model.parallel import SINGLE, TPGroup
from glmserve.shared.ports import free_port
from glmserve.shared.protocol import SamplingParams
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.runner.sampler import SamplingTensors, make_generator, sample

PAGE_SIZE = 16


def _pick(logits: torch.Tensor, params: list[SamplingParams], history: list[list[int]], starts: list[int],
          gens: list, tp: TPGroup) -> tuple[list[int], list[float]]:
    """Sample on rank 0 and broadcast (token ids, logprobs) so all ranks agree."""
    out = sample(logits, SamplingTensors.from_params(params, logits.device), history, gens, starts)
    packed = torch.stack([out.token_ids.double(), out.logprobs.double()])  # on the logits' device (NCCL)
    if tp.tp_size > 1:
        dist.broadcast(packed, src=0, group=tp.group)
    packed = packed.cpu()
    return [int(t) for t in packed[0]], [float(x) for x in packed[1]]


def generate(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             ignore_eos: bool = False, seed: int | None = None, page_size: int = PAGE_SIZE) -> list[dict]:
    """Batched prefill then step-by-step decode of every prompt; returns [{"token_ids", "logprobs"}]."""
    pages_per_seq = [-(-(len(p) + max_new_tokens) // page_size) for p in prompts]
    kv = PagedKVCache(runner.kv_layout(page_size), sum(pages_per_seq) + 1, runner.device)
    tables, nxt = [], 1  # page 0 left unused
    for n in pages_per_seq:
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                             seed=None if seed is None else seed + i) for i in range(len(prompts))]
    gens = [make_generator(p.seed, runner.device) if p.seed is not None else None for p in params]
    history = [list(p) for p in prompts]
    outputs = [{"token_ids": [], "logprobs": []} for _ in prompts]
    eos = set(runner.config.eos_token_ids)
    active = [i for i, p in enumerate(prompts) if max_new_tokens > 0]
    chunks = [(prompts[i], 0, tables[i]) for i in active]
    mode = ForwardMode.PREFILL
    while active:
        batch = ForwardBatch.build(mode, chunks, page_size, device=runner.device)
        logits = runner.forward(batch, kv).logits
        toks, lps = _pick(logits, [params[i] for i in active], [history[i] for i in active],
                          [len(prompts[i]) for i in active], [gens[i] for i in active], runner.tp)
        still = []
        for i, tok, lp in zip(active, toks, lps):
            outputs[i]["token_ids"].append(tok)
            outputs[i]["logprobs"].append(lp)
            history[i].append(tok)
            done = len(outputs[i]["token_ids"]) >= max_new_tokens or (tok in eos and not ignore_eos)
            if not done:
                still.append(i)
        active, mode = still, ForwardMode.DECODE
        chunks = [([history[i][-1]], len(history[i]) - 1, tables[i]) for i in active]
    return outputs


def _underscore(arg: str) -> str:
    """--load-format=x -> --load_format=x (dashes accepted in flag names)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = [_underscore(a) for a in (sys.argv[1:] if argv is None else argv)]
    p = argparse.ArgumentParser(prog="python -m glmserve.shared.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--prompt_ids_json", default=None)
    p.add_argument("--prompt", default=None, help="text prompt (needs a tokenizer in model_dir)")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore_eos", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--load_format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--quantization", default=None, choices=["fp8"])
    p.add_argument("--page_size", type=int, default=PAGE_SIZE)
    return p.parse_args(argv)


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    if args.prompt_ids_json is not None:
        prompts = json.loads(args.prompt_ids_json)
        if not (isinstance(prompts, list) and all(isinstance(p, list) and p for p in prompts)):
            raise SystemExit("--prompt_ids_json must be a JSON list of non-empty lists of token ids")
        return [[int(t) for t in p] for p in prompts]
    if args.prompt is not None:
        from glmserve.shared.tokenizer import load_tokenizer

        return [load_tokenizer(args.model_dir).encode(args.prompt)]
    raise SystemExit("give --prompt_ids_json or --prompt")


def run_rank(args: argparse.Namespace, tp: TPGroup) -> list[dict]:
    device = f"cuda:{tp.tp_rank}" if args.device == "cuda" else "cpu"
    runner = ModelRunner(args.model_dir, device=device, dtype=args.dtype, tp=tp, load_format=args.load_format,
                         quantization=args.quantization, with_mtp=False, seed=args.seed or 0)
    return generate(runner, _prompts(args), args.max_new_tokens, args.temperature, args.ignore_eos, args.seed,
                    args.page_size)


def _tp_worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp)
    try:
        outputs = run_rank(args, TPGroup(rank, args.tp, None))
        if rank == 0:
            print(json.dumps({"outputs": outputs}), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tp == 1:
        print(json.dumps({"outputs": run_rank(args, SINGLE)}), flush=True)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_tp_worker, args=(args, free_port()), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
