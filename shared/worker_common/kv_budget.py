"""KV cache pages from a share of the GPU's memory (vLLM's --gpu-memory-utilization, SGLang's
--mem-fraction-static): the fraction of the device's total memory this worker process may hold, weights
included. Two workers sharing one GPU (the one-GPU fleet) each take their share, e.g. 0.45.

pages = (fraction * total - held - reserve) // page_bytes, where held is what the process's caching
allocator holds once the weights are loaded and reserve covers what comes after the KV cache and what
the allocator does not see (a fixed allowance, not a profiled peak):
- the CUDA context, cuBLAS / NCCL workspaces: CONTEXT_BYTES;
- the largest forward's activations (prefill: an 8192-token chunk) or the decode CUDA graphs' pool:
  ACTIVATION_BYTES.
"""

from __future__ import annotations

import torch

GiB = 1 << 30
CONTEXT_BYTES = 1 * GiB
ACTIVATION_BYTES = 3 * GiB


def kv_pages_for_budget(total: int, held: int, page_bytes: int, fraction: float,
                        reserve: int = CONTEXT_BYTES + ACTIVATION_BYTES) -> int:
    """Pages that fit in fraction * total bytes after `held` and `reserve`; ValueError (with the numbers)
    when fewer than 2 fit (page 0 is a decode worker's dummy page)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--gpu_memory_utilization {fraction}: expected 0 < fraction <= 1")
    left = int(fraction * total) - held - reserve
    pages = max(0, left) // page_bytes
    if pages < 2:
        raise ValueError(
            f"--gpu_memory_utilization {fraction}: {fraction * total / GiB:.1f} GiB of the GPU's {total / GiB:.1f} "
            f"leaves {left / GiB:.2f} GiB for the KV cache after {held / GiB:.1f} GiB of weights and "
            f"{reserve / GiB:.1f} GiB for activations; raise the fraction or give --num_pages")
    return pages


def kv_pages_on_device(device: torch.device, page_bytes: int, fraction: float) -> int:
    """kv_pages_for_budget for this process on `device`, right after its weights are loaded."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()  # blocks freed during loading are not the weights'
    return kv_pages_for_budget(total, torch.cuda.memory_reserved(device), page_bytes, fraction)
