"""Which Linear layers hold FP8 weights (every worker rank; spec §4).

- A checkpoint with a quantization_config: exactly the modules whose `.weight` is stored F8_E4M3.
- `--quantization fp8` on a float checkpoint: every Linear except the spec's ignore list (lm_head,
  embeddings, norms, router gates and the MTP eh_proj never go through `BuildCtx.linear` or are excluded
  here), quantized per output channel at load.
"""

from __future__ import annotations

import re
from typing import Callable

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.weights.loader import fp8_tensor_names

ONLINE_IGNORE = re.compile(r"(^lm_head$|embed_tokens|norm|\.mlp\.gate$|eh_proj|shared_head)")


def fp8_policy(cfg: ModelConfig, model_dir: str | None, quantization: str | None) -> Callable[[str], bool]:
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization {quantization!r}: only fp8 is supported")
    if cfg.quantization is not None and model_dir is not None:
        names = frozenset(fp8_tensor_names(model_dir))
        return names.__contains__
    if quantization == "fp8" or cfg.quantization is not None:  # online, or dummy weights at an fp8 config
        return lambda name: ONLINE_IGNORE.search(name) is None
    return lambda name: False
