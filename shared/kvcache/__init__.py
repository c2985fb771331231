"""KV pages of one worker rank and the links that move them (prefill and decode workers).

- `cache.PagedKVCache` / `cache.KVLayout`: the one-tensor page pool (layout fixed).
- `allocator.PageAllocator`: free list + owner accounting (leader only; pure Python).
- `link.KVLink`: the transfer interface (contract in its docstring); `pg_link.PGLink` implements
  it over gloo (CPU) or NCCL (GPU); `rendezvous.connect_link` / `accept_link` build one.
The per-request handoff state machines live with their workers (`decode_worker/handoff.py`,
`prefill_worker/pusher.py`).
"""
