"""`python -m glmserve.decode_worker ...`: a decode worker process (leader, or a TP follower rank).

Builds config from the CLI, then hands over to shared.worker_common.process.run_worker, which
starts followers, serves health, loads the model and runs DecodeWorker's loop. The leader hosts
the KV-link rendezvous (a TCPStore on --link_port, at --link_host or the control address's host).
"""

from __future__ import annotations

import sys

from glmserve.shared.worker_common.config import add_flag, addr_host, common_parser, worker_config


def main(argv: list[str] | None = None) -> None:
    p = common_parser("decode")
    add_flag(p, "link_port", type=int, required=True)
    add_flag(p, "link_host", default="")
    add_flag(p, "max_running", type=int, default=64)
    add_flag(p, "reserve_new_tokens", type=int, default=256,
             help="decode tokens reserved up front per request (min with max_new_tokens); more grow on demand")
    add_flag(p, "handoff_timeout_s", type=float, default=60.0)
    add_flag(p, "mtp_mode", default="vanilla_with_att", choices=["vanilla_with_att", "eagle_with_att"],
             help="K > 1 chaining of the one MTP layer: vanilla_with_att feeds its block output back (vLLM), "
                  "eagle_with_att that output after shared_head.norm (SGLang EAGLE)")
    add_flag(p, "graph_max_batch_size", type=int, default=None,
             help="CUDA graphs of DECODE steps up to this batch (default --max_running on cuda, at most 512; "
                  "0 = off; cpu: padded eager)")
    add_flag(p, "graph_max_seq_len", type=int, default=0,
             help="longest sequence a graph step takes (0 = --max_req_total_len, else the model's max positions)")
    add_flag(p, "max_req_total_len", type=int, default=0,
             help="prompt + new tokens limit of a request (0 = the model's max_position_embeddings)")
    add_flag(p, "disable_overlap_schedule", action="store_true",
             help="read each step's tokens back before launching the next (SGLang's flag); default: the "
                  "overlap loop (decode_worker/worker.py), off anyway with --mtp_step")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = worker_config("decode", a)
    link_host = a.link_host or addr_host(a.control_addr)

    def build(cfg, engine, io, metrics):
        from glmserve.shared.kvcache.allocator import PageAllocator
        from glmserve.decode_worker import graphs
        from glmserve.decode_worker.worker import DecodeWorker

        max_pos = engine.runner.config.max_position_embeddings
        spec = graphs.graph_spec(cfg.device, a.graph_max_batch_size, a.graph_max_seq_len, a.max_running,
                                 a.max_req_total_len, max_pos, cfg.mtp_step, cfg.page_size)
        graphs.capture(engine, spec)  # before the worker exists: /readyz stays 503 until it is done
        pages = PageAllocator(engine.num_pages)  # reserves page 0: graph pad rows write there
        return DecodeWorker(cfg, engine, io, metrics, pages, link_host, a.link_port, a.max_running,
                            a.reserve_new_tokens, a.handoff_timeout_s,
                            max_seq_len=min(a.max_req_total_len or max_pos, max_pos),
                            mtp_chain_normed=a.mtp_mode == "eagle_with_att",
                            overlap=not a.disable_overlap_schedule)

    from glmserve.shared.worker_common.process import run_worker

    run_worker(cfg, "glmserve.decode_worker", build)


if __name__ == "__main__":
    main()
