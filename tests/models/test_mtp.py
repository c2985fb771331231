"""MTP draft logits: glm4_moe vs transformers' MtpModel, glm4_moe_lite vs a direct spec §3.2 implementation
(HF's lite decoder layer + enorm/hnorm/eh_proj/shared_head.norm written here). Prefill-style drafting of
three sequences at once, then one decode-style draft row per sequence that reads the MTP layer's cache."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from tests.models.helpers import Pages, rel_err

PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
PAGE = 4


def _mtp_state(model_dir: str, n: int) -> dict[str, torch.Tensor]:
    sd = load_file(f"{model_dir}/model-mtp.safetensors")
    return {k[len(f"model.layers.{n}."):]: v for k, v in sd.items()}


def _fuse_experts(block_sd: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint keys -> HF in-memory fused `mlp.experts.gate_up_proj` / `down_proj`."""
    out = {k: v for k, v in block_sd.items() if ".experts." not in k}
    e = range(num_experts)
    out["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([block_sd[f"mlp.experts.{i}.gate_proj.weight"], block_sd[f"mlp.experts.{i}.up_proj.weight"]]) for i in e])
    out["mlp.experts.down_proj"] = torch.stack([block_sd[f"mlp.experts.{i}.down_proj.weight"] for i in e])
    return out


class SpecMtp:
    """Reference draft: h = block(eh_proj([enorm(emb(x)), hnorm(h_prev)])); logits = lm_head(norm(h))."""

    def __init__(self, hf, model_dir: str, arch: str):
        cfg = hf.config
        n = cfg.num_hidden_layers
        sd = _mtp_state(model_dir, n)
        self.hf, self.sd, self.eps = hf, sd, cfg.rms_norm_eps
        if arch == "glm4_moe":
            from transformers.modeling_layers import MtpModel

            mtp = MtpModel(hf, 1).eval()
            block = {f"layers.0.mtp_block.{k}": v for k, v in _fuse_experts(sd, cfg.n_routed_experts).items()
                     if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))}
            extra = {"layers.0.enorm.weight": sd["enorm.weight"], "layers.0.hnorm.weight": sd["hnorm.weight"],
                     "layers.0.eh_proj.weight": sd["eh_proj.weight"], "layers.0.post_norm.weight": sd["shared_head.norm.weight"]}
            missing, unexpected = mtp.load_state_dict({**block, **extra}, strict=False)
            assert not unexpected and all(k.startswith(("embed_tokens", "shared_head")) for k in missing), (missing, unexpected)
            self.mtp = mtp
        else:
            import copy

            from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteDecoderLayer

            lcfg = copy.deepcopy(cfg)
            lcfg.mlp_layer_types = list(cfg.mlp_layer_types) + ["sparse"]
            self.block = Glm4MoeLiteDecoderLayer(lcfg, n).eval()
            block = {k: v for k, v in _fuse_experts(sd, cfg.n_routed_experts).items()
                     if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))}
            self.block.load_state_dict(block, strict=True)
            self.mtp = None

    def _norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @torch.no_grad()
    def logits(self, ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """ids: x_{p+1} for p = 0..n-1; hidden [n, H] target post-norm hidden at p. -> [n, V]."""
        x, h = torch.tensor([ids]), hidden[None]
        if self.mtp is not None:  # transformers' positions are the shifted ones (p + 1)
            pos = torch.arange(1, len(ids) + 1)[None]
            out = self.mtp.forward_layer(0, h, pos, None, input_ids=x)
            return self.mtp.shared_head(out)[0]
        sd = self.sd
        e = self._norm(self.hf.model.embed_tokens(x), sd["enorm.weight"])
        z = torch.cat([e, self._norm(h, sd["hnorm.weight"])], -1) @ sd["eh_proj.weight"].t()
        pos = torch.arange(len(ids))[None]
        mask = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
        z = self.block(z, attention_mask=mask, position_ids=pos, position_embeddings=self.hf.model.rotary_emb(z, pos))
        return self.hf.lm_head(self._norm(z, sd["shared_head.norm.weight"]))[0]


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_mtp_draft_matches_reference(tiny_dirs, arch):
    model_dir = tiny_dirs[arch]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = SpecMtp(hf, model_dir, arch)
    runner = ModelRunner(model_dir, dtype=torch.float32)
    assert runner.has_mtp and runner.kv_layout(PAGE).num_layers == hf.config.num_hidden_layers + 1
    kv, pages = PagedKVCache(runner.kv_layout(PAGE), 64), Pages(64, PAGE)
    seqs = [(p, 0, pages.ensure(i, len(p) + 1)) for i, p in enumerate(PROMPTS)]
    target = runner.forward(ForwardBatch.build(ForwardMode.PREFILL, seqs, PAGE), kv)
    nxt = target.logits.argmax(-1).tolist()
    full = [p + [t] for p, t in zip(PROMPTS, nxt)]  # x_{p+1} for every row: shifted prompt + sampled token
    draft_batch = ForwardBatch.build(ForwardMode.DRAFT, [(f[1:], 0, s[2]) for f, s in zip(full, seqs)], PAGE, "all")
    draft = runner.mtp_forward(draft_batch, draft_batch.input_ids, target.hidden, kv)
    starts = draft_batch.query_start_loc.tolist()
    for i, f in enumerate(full):
        want = ref.logits(f[1:], target.hidden[starts[i]:starts[i + 1]])
        assert rel_err(draft.logits[starts[i]:starts[i + 1]], want) <= 1e-4
    # decode-style: one more row per sequence reading the MTP cache of the rows above
    dec = runner.forward(ForwardBatch.build(ForwardMode.DECODE, [([f[-1]], len(f) - 1, pages.ensure(i, len(f) + 1))
                                                                for i, f in enumerate(full)], PAGE), kv)
    nxt2 = dec.logits.argmax(-1).tolist()
    rows = [([t], len(f) - 1, pages.ensure(i, len(f) + 1)) for i, (f, t) in enumerate(zip(full, nxt2))]
    step_batch = ForwardBatch.build(ForwardMode.DRAFT, rows, PAGE)
    step = runner.mtp_forward(step_batch, step_batch.input_ids, dec.hidden, kv)
    for i, (f, t) in enumerate(zip(full, nxt2)):
        hidden = torch.cat([target.hidden[starts[i]:starts[i + 1]], dec.hidden[i:i + 1]])
        assert rel_err(step.logits[i], ref.logits(f[1:] + [t], hidden)[-1]) <= 1e-4
