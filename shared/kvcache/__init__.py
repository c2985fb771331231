"""KV pages of one worker rank and the links that move them (prefill and decode workers).

- `cache.PagedKVCache` / `cache.KVLayout`: the one-tensor page pool (layout fixed).
- `allocator.PageAllocator`: free list + owner accounting (leader only; pure Python).
- `link.KVLink`: the transfer interface (contract in its docstring); `pg_link.PGLink` implements
  it over gloo (CPU) or NCCL (GPU); `rendezvous.connect_link` / `accept_link` build one.
- `handoff.HandoffTable`: per-request handoff state machine (forward-only, deadlines, idempotent
  release) on top of a KVLink and a PageAllocator.
"""
