"""Share a KV cache buffer with another process on the same host (the IPC KV link).

CUDA: the buffer is an ordinary allocation; `export_buffer` serializes its CUDA IPC handle
(torch's own `_share_cuda_`, the handle torch.multiprocessing sends) and `open_buffer` maps it in
the other process (same GPU, or a peer GPU of the same host). CPU (tests, the CPU fleet): the buffer
must live in a named POSIX shared-memory segment, so `PagedKVCache(..., shareable=True)` allocates
it with `alloc_shareable`; the handle is the segment's name.

Handles are msgpack data, never pickles: they travel through the link's TCPStore.
"""

from __future__ import annotations

import atexit
import math
from multiprocessing import resource_tracker, shared_memory

import msgspec
import torch


class CudaHandle(msgspec.Struct, array_like=True, tag=True):
    shape: list[int]
    stride: list[int]
    offset: int  # elements, in the storage
    dtype: str
    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class ShmHandle(msgspec.Struct, array_like=True, tag=True):
    shape: list[int]
    dtype: str
    name: str


Handle = CudaHandle | ShmHandle
_SEGMENTS: dict[int, shared_memory.SharedMemory] = {}  # data_ptr -> segment, alive while the buffer is
_OWNED: set[str] = set()  # segments this process created (it unlinks them)


def create_segment(size: int) -> shared_memory.SharedMemory:
    seg = shared_memory.SharedMemory(create=True, size=size)
    _OWNED.add(seg._name)  # noqa: SLF001
    return seg


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Another process's segment. Attaching registers it with this process's resource tracker, which
    (Python < 3.13) would unlink it at our exit: unregister, unless this process owns it too."""
    seg = shared_memory.SharedMemory(name=name)
    if seg._name not in _OWNED:  # noqa: SLF001
        try:
            resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001
        except Exception:  # noqa: BLE001
            pass
    return seg


def alloc_shareable(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of `shape`; on CPU in a named shared-memory segment (unlinked when the process exits)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = max(1, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    seg = create_segment(nbytes)
    t = torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
    t.zero_()
    _SEGMENTS[t.data_ptr()] = seg
    atexit.register(_unlink, seg)
    return t


def _unlink(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.unlink()  # the name goes; mappings (the decode's) stay valid until they close
    except FileNotFoundError:
        pass


def export_buffer(buf: torch.Tensor) -> bytes:
    if buf.is_cuda:
        (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
         event_sync) = buf._typed_storage()._share_cuda_()
        h = CudaHandle(list(buf.shape), list(buf.stride()), buf.storage_offset(), str(buf.dtype).removeprefix("torch."),
                       device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync)
        return msgspec.msgpack.encode(h)
    seg = _SEGMENTS.get(buf.data_ptr())
    if seg is None:
        raise ValueError("a CPU buffer must come from alloc_shareable to be shared")
    return msgspec.msgpack.encode(ShmHandle(list(buf.shape), str(buf.dtype).removeprefix("torch."), seg.name))


def open_buffer(data: bytes) -> torch.Tensor:
    """The other process's buffer, mapped here (alive as long as the returned tensor)."""
    h = msgspec.msgpack.decode(data, type=Handle)
    dtype = getattr(torch, h.dtype)
    if isinstance(h, ShmHandle):
        seg = attach_segment(h.name)
        nbytes = math.prod(h.shape) * torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes).view(dtype).view(h.shape)
        _SEGMENTS[t.data_ptr()] = seg
        return t
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(torch.Tensor, torch.Size(h.shape), tuple(h.stride), h.offset,
                               torch.storage.TypedStorage, dtype, h.device, h.handle, h.size_bytes, h.offset_bytes,
                               False, h.ref_counter_handle, h.ref_counter_offset, h.event_handle,
                               h.event_sync_required)
