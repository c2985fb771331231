"""Load HF safetensors (single file or sharded with an index) into a model by the checkpoint's own names.

Runs in every worker rank; each parameter's `weight_loader` cuts this rank's TP shard. Routed experts
`...mlp.experts.{e}.{gate,up,down}_proj.weight[_scale]` go to the stacked expert tensors, and so does
`...mlp.shared_experts.*` when the MoE fuses its shared expert (its slot E). An unknown
checkpoint key, or a model parameter nothing loaded, is an error that names it. Keys skipped on purpose:
MTP layers when the MTP layer is not built, the MTP's optional copies of embed_tokens / shared_head.head
(equal to the main ones, spec §3.1), and rotary inv_freq buffers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from glmserve.shared.weights.lazy import LazyTensor, materialize

EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale)$")
SHARED_EXPERT_RE = re.compile(r"^(.*\.mlp)\.shared_experts\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale)$")
FUSED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")  # transformers-5 in-memory layout
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, name) for name in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_tensors(model_dir: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """(key, tensor) for every checkpoint tensor; lazy=True yields LazyTensors (read on use, only the
    rows/columns a rank keeps). A LazyTensor must be used before the next file is opened."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, (LazyTensor.from_safetensors(f.get_slice(key)) if lazy else f.get_tensor(key))


def fp8_tensor_names(model_dir: str) -> set[str]:
    """Module names whose `.weight` is stored as F8_E4M3 (read from headers only)."""
    names = set()
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight") and f.get_slice(key).get_dtype() == "F8_E4M3":
                    names.add(key[: -len(".weight")])
    return names


def _skip(key: str, num_main_layers: int, num_mtp: int) -> bool:
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = LAYER_RE.match(key)
    if m is None or int(m.group(1)) < num_main_layers:
        return False
    if int(m.group(1)) >= num_main_layers + num_mtp:
        return True  # MTP layer not built
    rest = key[m.end():]  # the MTP's own copies of embed / lm_head (and their FP8 scales, if any)
    return rest.startswith(("embed_tokens.", "shared_head.head."))


def _merged_aliases(model: nn.Module) -> dict[str, tuple[str, int]]:
    """`<parent>.<part name>.<leaf>` -> (`<parent>.<merged>.<leaf>`, part) for every merged Linear."""
    aliases = {}
    for path, module in model.named_modules():
        parent = path.rpartition(".")[0]
        for part, part_name in enumerate(getattr(module, "part_names", ())):
            for leaf in ("weight", "bias", "weight_scale"):
                aliases[f"{parent}.{part_name}.{leaf}"] = (f"{path}.{leaf}", part)
    return aliases


class WeightLoader:
    """Tracks what was loaded so missing parameters and unknown keys are errors."""

    def __init__(self, model: nn.Module, num_main_layers: int, num_mtp: int):
        self.model, self.num_main, self.num_mtp = model, num_main_layers, num_mtp
        self.params = dict(model.named_parameters())
        self.aliases = _merged_aliases(model)  # checkpoint key -> (param name, part)
        self.loaded: set[tuple[str, int]] = set()
        self.expert_loads: dict[str, int] = {}
        self.tie_embeddings = bool(getattr(getattr(model, "cfg", None), "tie_word_embeddings", False))

    def load_one(self, key: str, tensor: torch.Tensor) -> None:
        if _skip(key, self.num_main, self.num_mtp):
            return
        fused = FUSED_EXPERT_RE.match(key)
        if fused is not None:
            return self._load_fused_experts(key, fused.group(1), fused.group(2), tensor)
        m = EXPERT_RE.match(key)
        if m is not None:
            return self._load_expert(key, m.group(1), int(m.group(2)), m.group(3), m.group(4), tensor)
        m = SHARED_EXPERT_RE.match(key)
        owner = f"{m.group(1)}.experts" if m is not None else ""
        if m is not None and f"{owner}.w13" in self.params and self.model.get_submodule(owner).shared_slot is not None:
            slot = self.model.get_submodule(owner).shared_slot
            return self._load_expert(key, owner, slot, m.group(2), m.group(3), tensor)
        if key == "model.embed_tokens.weight" and "lm_head.weight" in self.params and self.tie_embeddings:
            self.load_one("lm_head.weight", tensor)  # tie_word_embeddings: lm_head is not in the checkpoint
        name, part = self.aliases.get(key, (key, 0))
        param = self.params.get(name)
        if param is None:
            raise KeyError(f"unknown checkpoint key {key!r} (no parameter of that name in the model)")
        if part:
            param.weight_loader(param, tensor, part)
        else:
            param.weight_loader(param, tensor)
        self.loaded.add((name, part))

    def _load_expert(self, key: str, owner: str, slot: int, proj: str, kind: str, tensor) -> None:
        experts = self.model.get_submodule(owner) if f"{owner}.w13" in self.params else None
        if experts is None or (kind == "weight_scale" and not experts.fp8):
            raise KeyError(f"unknown checkpoint key {key!r} (no such expert parameter in the model)")
        experts.load_expert(slot, proj, kind, tensor)
        self.expert_loads[owner] = self.expert_loads.get(owner, 0) + 1

    def _load_fused_experts(self, key: str, owner: str, kind: str, tensor) -> None:
        """gate_up_proj [E, 2I, H] ([gate; up] rows) or down_proj [E, H, I], as save_original_format=False writes."""
        if f"{owner}.w13" not in self.params:
            raise KeyError(f"unknown checkpoint key {key!r} (no such expert parameter in the model)")
        experts = self.model.get_submodule(owner)
        tensor = materialize(tensor)
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                experts.load_expert(e, "down_proj", "weight", tensor[e])
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                experts.load_expert(e, "gate_proj", "weight", gate)
                experts.load_expert(e, "up_proj", "weight", up)
        self.expert_loads[owner] = self.expert_loads.get(owner, 0) + tensor.shape[0] * (1 if kind == "down_proj" else 2)

    def check_complete(self) -> None:
        missing: list[str] = []
        for name, param in self.params.items():
            owner, _, leaf = name.rpartition(".")
            if leaf in ("w13", "w2", "w13_scale", "w2_scale"):
                if leaf == "w13":
                    missing.extend(self._missing_experts(owner))
            elif not getattr(param, "loaded_online", False):
                module = self.model.get_submodule(owner) if owner else self.model
                names = getattr(module, "part_names", ()) if leaf != "bias" or module.parallel != "row" else ()
                for part in range(max(1, len(names))):
                    if (name, part) not in self.loaded:
                        missing.append(f"{owner.rpartition('.')[0]}.{names[part]}.{leaf}" if names else name)
        if missing:
            raise KeyError(f"checkpoint is missing weights: {', '.join(missing[:20])}"
                           + (f" ... ({len(missing)} in all)" if len(missing) > 20 else ""))

    def _missing_experts(self, owner: str) -> list[str]:
        """Every expert needs gate/up/down weights (+ their scales for an FP8 checkpoint)."""
        experts = self.model.get_submodule(owner)
        per_expert = 6 if experts.fp8 and not experts.quantized_online else 3
        want, got = per_expert * experts.w13.shape[0], self.expert_loads.get(owner, 0)
        return [] if got >= want else [f"{owner} ({got}/{want} expert tensors)"]


@torch.no_grad()
def load_checkpoint(model: nn.Module, model_dir: str, num_main_layers: int, num_mtp: int,
                    fp8_block: tuple[int, int] | None = None) -> None:
    """fp8_block: the checkpoint's weight block size when it is block-scaled FP8 (see block_fp8.py)."""
    from glmserve.shared.weights.block_fp8 import BlockPairer

    loader = WeightLoader(model, num_main_layers, num_mtp)
    pairer = BlockPairer(fp8_block) if fp8_block else None
    for key, tensor in iter_tensors(model_dir, lazy=True):
        for k, t in (pairer.feed(key, tensor) if pairer else [(key, tensor)]):
            loader.load_one(k, t)
    if pairer:
        pairer.check_empty()
    loader.check_complete()
