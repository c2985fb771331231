"""LazyTensor: narrowed reads through safetensors slices equal narrowing the full tensor."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmserve.shared.weights.lazy import LazyTensor


def test_lazy_narrow_matches_full(tmp_path):
    full = torch.randn(10, 7, dtype=torch.bfloat16)
    save_file({"w": full, "q": full.float().to(torch.float8_e4m3fn)}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        lazy = LazyTensor.from_safetensors(f.get_slice("w"))
        assert lazy.shape == full.shape and lazy.dtype == torch.bfloat16
        part = lazy.narrow(0, 3, 4).narrow(1, 2, 5).narrow(0, 1, 2)
        assert part.shape == (2, 5)
        assert torch.equal(part.materialize(), full[4:6, 2:7])
        q = LazyTensor.from_safetensors(f.get_slice("q"))
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.narrow(1, 0, 3).materialize().float(),
                                                            full.float().to(torch.float8_e4m3fn)[:, :3].float())
