"""A constructed tiny checkpoint whose MTP layer drafts perfectly (MTP tests only; no server process runs it).

Built from `write_tiny_checkpoint` (real HF layout, both architectures) and then rewritten so that:
- every attention o_proj and every MLP / expert / shared-expert down_proj is zero, so each decoder
  layer (and the MTP block) passes its residual stream through unchanged: the target's hidden at
  position p is embed(x_p);
- embedding rows are unit vectors (distinct, so <e_x, e_x> = 1 > <e_y, e_x> for y != x), all norm
  weights are 1, and lm_head row f(x) = SCALE * e_x for a fixed permutation f of the vocabulary:
  the target's argmax after x is f(x), with a margin of several logits (checked here);
- eh_proj = [I | 0] (keeps the embedding half, drops the hidden half), so the MTP layer maps
  token x_{p+1} to logits argmax f(x_{p+1}) = x_{p+2}, exactly what the target will say.
Greedy decoding from token x then emits x, f(x), f(f(x)), ... and every draft is accepted:
acceptance length K + 1 per verify forward.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from glmserve.shared.weights.tiny import write_tiny_checkpoint

SCALE = 4.0  # lm_head row norm: target logit of f(x) is SCALE * sqrt(H); others at most SCALE * sqrt(H) * max cos
PERM_FILE = "constructed_mtp.json"


def _zeroed(name: str) -> bool:
    """Output projections whose zeroing makes attention and MLP blocks add nothing to the residual."""
    return name.endswith(("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj"))


def _rewrite(sd: dict[str, torch.Tensor], embed: torch.Tensor, head: torch.Tensor, h: int) -> None:
    for name, t in sd.items():
        if _zeroed(name):
            sd[name] = torch.zeros_like(t)
        elif name.endswith("norm.weight") and t.dim() == 1 and t.shape[0] == h:  # every RMSNorm over H
            sd[name] = torch.ones_like(t)
        elif name == "model.embed_tokens.weight" or name.endswith(".embed_tokens.weight"):
            sd[name] = embed.to(t.dtype)
        elif name == "lm_head.weight" or name.endswith("shared_head.head.weight"):
            sd[name] = head.to(t.dtype)
        elif name.endswith("eh_proj.weight"):
            sd[name] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1).to(t.dtype)


def _tables(vocab: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(embed [V, H] unit rows, lm_head [V, H] with row f(x) = SCALE e_x, f as a list)."""
    g = torch.Generator().manual_seed(seed + 101)
    embed = torch.randn(vocab, h, generator=g)
    embed = embed / embed.norm(dim=1, keepdim=True)
    perm = torch.randperm(vocab, generator=g)
    head = torch.empty_like(embed)
    head[perm] = SCALE * embed  # head[f(x)] = SCALE * e_x
    # the target's argmax after x (hidden = e_x normed to rms 1, i.e. sqrt(H) e_x) must be f(x)
    logits = (embed * h**0.5) @ head.t()  # [V, V]
    top2 = logits.topk(2, dim=1).values
    assert torch.equal(logits.argmax(1), perm) and bool((top2[:, 0] - top2[:, 1] > 2.0).all())
    return embed, head, perm.tolist()


def write_constructed_mtp_checkpoint(path: str, arch: str = "glm4_moe", seed: int = 0, **overrides) -> str:
    """Write the checkpoint at `path`; the permutation f is saved as `constructed_mtp.json` ({"next": f})."""
    write_tiny_checkpoint(path, arch, seed=seed, **overrides)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    vocab, h = cfg["vocab_size"], cfg["hidden_size"]
    embed, head, perm = _tables(vocab, h, seed)
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            full = os.path.join(path, fname)
            sd = load_file(full)
            _rewrite(sd, embed, head, h)
            save_file(sd, full, metadata={"format": "pt"})
    with open(os.path.join(path, PERM_FILE), "w") as f:
        json.dump({"next": perm}, f)
    return path


def next_token_map(path: str) -> list[int]:
    """f: the constructed model's greedy next token after each token id."""
    with open(os.path.join(path, PERM_FILE)) as f:
        return json.load(f)["next"]


def chain(start: int, f: list[int], n: int) -> list[int]:
    """[f(start), f(f(start)), ...] n tokens: the greedy continuation after `start`."""
    out, x = [], start
    for _ in range(n):
        x = f[x]
        out.append(x)
    return out
