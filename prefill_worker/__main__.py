"""`python -m glmserve.prefill_worker ...`: a prefill worker process (leader, or a TP follower rank).

Builds config from the CLI, then hands over to shared.worker_common.process.run_worker, which
starts followers, serves health, loads the model and runs PrefillWorker's loop.
"""

from __future__ import annotations

import sys

from glmserve.shared.worker_common.config import add_flag, common_parser, parse_peers, worker_config


def main(argv: list[str] | None = None) -> None:
    p = common_parser("prefill")
    add_flag(p, "decode", action="append", default=[], help="decode leader: id=tcp://host:port (repeat)")
    add_flag(p, "chunked_prefill_size", type=int, default=0,
             help="prompt tokens per prefill step; 0 = 8192 on cuda (as vLLM / SGLang on large GPUs: "
                  "fewer, fuller forwards; every MoE forward reads all experts' weights), 512 on cpu")
    add_flag(p, "relink_check_s", type=float, default=5.0,
             help="how often LinkHello re-asks a linked decode for its link epoch (an idle link does not "
                  "notice a restarted decode; a request reserved on another epoch also triggers a rebuild)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = worker_config("prefill", a)
    chunk = a.chunked_prefill_size or (8192 if cfg.device == "cuda" else 512)
    decodes = parse_peers(a.decode)

    def build(cfg, engine, io, metrics):
        from glmserve.shared.kvcache.allocator import PageAllocator
        from glmserve.prefill_worker.worker import PrefillWorker

        pages = PageAllocator(engine.num_pages)
        return PrefillWorker(cfg, decodes, engine, io, metrics, pages, chunk, a.relink_check_s)

    from glmserve.shared.worker_common.process import run_worker

    run_worker(cfg, "glmserve.prefill_worker", build)


if __name__ == "__main__":
    main()
