"""Multi-head latent attention over the paged cache (glm4_moe_lite; each worker rank).

Cache entry per token (one "kv head", identical on every TP rank): [normed latent (L) | roped k_pe (R)].
Decode, verify, draft and short prefills absorb the up-projections:
  q_lat[t,h] = q_nope[t,h] @ W_UK[h]   (W_UK[h]: [nope, L] rows of kv_b_proj)
  scores     = (q_lat . latent + q_pe . k_pe) * qk_head_dim^-0.5
  o[t,h]     = (softmax(scores) @ latent) @ W_UV[h]^T   (W_UV[h]: [v, L])
which equals HF's expanded form. Prefill batches with a query of >= EXPAND_MIN_Q tokens run HF's
expanded form instead (as vLLM / SGLang prefill): every position's K/V decompressed from the cache by
kv_b_proj, then plain causal attention with Dk = nope + R, Dv = v: per (query, key) pair 2 * (nope +
R + v) FLOPs per head instead of 2 * (2L + R) (GLM-4.7-Flash: 896 vs 2176, 2.4x fewer), in the
attention kernel's GQA tiles. The absorbed path stays the reference it is tested against. TP: q_b_proj / kv_b_proj column-parallel by head, o_proj row-parallel,
q_a_proj / kv_a_proj_with_mqa replicated. q_a/kv_a layernorms use eps 1e-6 (as HF builds them).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model import ops
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.norm import RMSNorm
from glmserve.shared.model.layers.rope import RotaryEmbedding
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode

LORA_NORM_EPS = 1e-6  # HF Glm4MoeLiteRMSNorm default, used for q_a_layernorm / kv_a_layernorm
EXPAND_MIN_Q = 16  # a PREFILL batch whose longest query has this many tokens runs the expanded form
# Absorbed form with q_lora: q_a's RMSNorm and the cache write in one launch (ops.mla_prep), the query RoPE in
# the W_UK launch (ops.mla_absorb's rope), one launch a layer fewer than rms_norm + mla_kv_write. Measured
# slower, so off: H100 run 32 (bench/ab_step.py --switch mla_prep, FP8 GLM-4.7-Flash step, graph ms on / off,
# rounds alternated) B 1 3.92-4.15 / 3.87-3.90, B 64 15.01-15.18 / 14.92-15.15, B 256 19.30-19.53 / 19.02-19.04:
# the W_UK launch's N-block-0 programs rope before their GEMM and the whole launch waits on them (absorb 0.95 ->
# 1.09 ms a step at B 256). False: rms_norm(_fp8) + mla_kv_write (the reference path).
PREP_FUSED = False
# Absorbed form: mla_kv_write's cache write and query RoPE by programs of their own in the W_UK absorb launch
# (ops.mla_absorb's kv_write; one launch a layer fewer at every batch, the GEMM programs unchanged: PREP_FUSED's
# loss came from RoPE work inside the GEMM programs). Same bits (tests). For T <= KV_WRITE_IN_ABSORB_MAX_T tokens:
# H100 run 42 (median graph ms on / off) B 1 3.509 / 3.629, B 4 6.353 / 6.336, B 256 18.736 / 18.502 (likely cause,
# not profiled: the extra programs are one a (head, M block), each writing BLOCK_M / heads tokens one after another,
# ~3 at B 256, a tail after the GEMM programs). 0: the separate mla_kv_write launch (ab_step --switch mla_kv_in_absorb).
KV_WRITE_IN_ABSORB_MAX_T = 1


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, ctx: BuildCtx, prefix: str):
        super().__init__()
        h, heads, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.lora, self.rope = cfg.kv_lora_rank, rope
        self.num_heads = heads // ctx.tp.tp_size
        self.scale = cfg.qk_head_dim ** -0.5
        qk, lin = cfg.qk_head_dim, ctx.linear
        self.q_lora = cfg.q_lora_rank or 0
        if self.q_lora:  # q_a_proj and kv_a_proj_with_mqa as one replicated GEMM (vLLM's fused_qkv_a_proj)
            self.fused_qkv_a_proj = ctx.merged(prefix, ("q_a_proj", "kv_a_proj_with_mqa"), h,
                                               [self.q_lora, self.lora + self.rope_dim], bias, "replicated")
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, ctx.dtype, ctx.device)
            self.q_b_proj = lin(f"{prefix}.q_b_proj", cfg.q_lora_rank, heads * qk, False, "column")
        else:
            self.q_proj = lin(f"{prefix}.q_proj", h, heads * qk, False, "column")
            self.kv_a_proj_with_mqa = lin(f"{prefix}.kv_a_proj_with_mqa", h, self.lora + self.rope_dim, bias)
        self.kv_a_layernorm = RMSNorm(self.lora, LORA_NORM_EPS, ctx.dtype, ctx.device)
        self.kv_b_proj = lin(f"{prefix}.kv_b_proj", self.lora, heads * (self.nope + self.v_dim), False, "column")
        self.o_proj = lin(f"{prefix}.o_proj", heads * self.v_dim, h, bias, "row")
        # forward may be handed x's per-token FP8 form (a fused norm) when the first GEMM is FP8
        self.input_fp8 = (self.fused_qkv_a_proj if self.q_lora else self.q_proj).fp8

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W_UK [h, nope, L], W_UV [h, v, L], their per-row scales [h, nope], [h, v] or None): views of
        kv_b_proj's own weight and scale, never copies (ops.mla_absorb dequantizes an FP8 tile in registers:
        the values of a dequantized bf16 copy at half its bytes, and no second copy of the weights)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.lora)
        s = self.kv_b_proj.weight_scale
        if s is not None:
            s = s.view(self.num_heads, self.nope + self.v_dim)
            return w[:, : self.nope], w[:, self.nope :], s[:, : self.nope], s[:, self.nope :]
        return w[:, : self.nope], w[:, self.nope :], None, None

    def _project(self, x: torch.Tensor, x_fp8) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (q [T, h_local * qk_head_dim], ckv [T, L + R])."""
        if self.q_lora:
            q_a, ckv = self.fused_qkv_a_proj.split(self.fused_qkv_a_proj(x, x_fp8))
            if self.q_b_proj.fp8:  # the norm's only consumer is q_b's FP8 GEMM: one op (one launch when fused)
                return self.q_b_proj.forward_normed(q_a, self.q_a_layernorm.weight, self.q_a_layernorm.eps), ckv
            return self.q_b_proj(self.q_a_layernorm(q_a)), ckv
        return self.q_proj(x, x_fp8), self.kv_a_proj_with_mqa(x, x_fp8)

    def forward(self, x: torch.Tensor, cos_sin, batch: ForwardBatch, kv_cache, cache_layer: int,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H] (x_fp8: its per-token FP8 form, from a fused norm) -> [T, H]; writes [latent | k_pe] of
        the batch tokens into cache layer `cache_layer`."""
        t = x.shape[0]
        cache = kv_cache.flat_layer(cache_layer)[0]  # [num_slots, 1, L + R]
        page_size = kv_cache.layout.page_size
        expanded = batch.mode is ForwardMode.PREFILL and max(batch.query_lens_cpu, default=0) >= EXPAND_MIN_Q
        # the roped q_pe's destination: its own [T, h, R] (expanded) or the last R dims of the absorbed
        # form's [h, T, L + R] query buffer (the attention kernels take any token / head strides)
        query_ht = None if expanded else torch.empty(self.num_heads, t, self.lora + self.rope_dim, dtype=x.dtype,
                                                     device=x.device)
        q_pe = (torch.empty(t, self.num_heads, self.rope_dim, dtype=x.dtype, device=x.device) if expanded
                else query_ht.transpose(0, 1)[..., self.lora :])
        rope = (self.rope.rotary_dim, self.rope.interleaved)
        kv_norm = (self.kv_a_layernorm.weight, self.kv_a_layernorm.eps)
        q_rope = kv_write = None  # the absorbed path's query RoPE / cache write, when the W_UK launch does it
        if self.q_lora and not expanded and PREP_FUSED:
            # one launch for q_a's norm and the cache write (q_pe's RoPE then rides on the W_UK launch)
            q_a, ckv = self.fused_qkv_a_proj.split(self.fused_qkv_a_proj(x, x_fp8))
            q_a, q_a_fp8 = ops.mla_prep(q_a, self.q_a_layernorm.weight, self.q_a_layernorm.eps, ckv, *kv_norm,
                                        *cos_sin, cache, batch.slot_mapping, *rope, self.q_b_proj.fp8)
            q = self.q_b_proj(q_a, q_a_fp8).view(t, self.num_heads, self.nope + self.rope_dim)
            q_rope = (q[..., self.nope :], *cos_sin, q_pe, *rope)
        else:
            q, ckv = self._project(x, x_fp8)
            q = q.view(t, self.num_heads, self.nope + self.rope_dim)
            # one op: the tokens' cache entries [normed latent | roped k_pe] at their slots, and q_pe roped
            kv_write = (ckv, *kv_norm, *cos_sin, cache, batch.slot_mapping, q[..., self.nope :], q_pe, *rope)
            if expanded or t > KV_WRITE_IN_ABSORB_MAX_T:
                ops.mla_kv_write(*kv_write)
                kv_write = None
        if expanded:
            o = self._expanded(q[..., : self.nope], q_pe, cache, batch, page_size).reshape(t, -1)
        else:
            o = self._absorbed(q, query_ht, cache, batch, page_size, q_rope, kv_write)
        return self.o_proj(o.to(x.dtype))

    def _absorbed(self, q, query_ht, cache, batch: ForwardBatch, page_size: int, q_rope=None,
                  kv_write=None) -> torch.Tensor:
        """q [T, h, nope + R] (before RoPE), query_ht [h, T, L + R] (its last R dims: the roped q_pe, or, with
        q_rope / kv_write, where the W_UK launch writes it: see ops.mla_absorb), cache [num_slots, 1, L + R] ->
        o [T, h * v], o_proj's input. No concatenation or reshape copies: W_UK's product is written into the
        query's first L dims; W_UV's product lands in a [T, h * v] buffer through its [T, h, v] view. Same values
        as einsum + cat + reshape (tests/models: HF parity)."""
        w_uk, w_uv, s_uk, s_uv = self._up_weights()
        t, h, dtype = q.shape[0], self.num_heads, q.dtype
        query = query_ht.transpose(0, 1)  # [T, h, L + R]
        ops.mla_absorb(q[..., : self.nope], w_uk, s_uk, True, query[..., : self.lora], q_rope, kv_write)
        o_lat = ops.paged_attention(query, cache, cache[..., : self.lora], batch, page_size, self.scale)  # [T, h, L]
        o = torch.empty(t, h * self.v_dim, dtype=dtype, device=q.device)
        ops.mla_absorb(o_lat.to(dtype), w_uv, s_uv, False, o.view(t, h, self.v_dim))
        return o

    def _expanded(self, q_nope, q_pe, cache, batch: ForwardBatch, page_size: int) -> torch.Tensor:
        """The same o [T, h, v] through K/V decompressed for all S = sum(seq_lens) positions of the
        batch's sequences (prefix and new tokens), laid out sequence after sequence: K [S, h, nope + R],
        V [S, h, v]; the attention kernel reads them through a page table of page size 1."""
        slots, table = _positions(batch, page_size)  # [S] cache slots, [B, max_seq_len] rows into K / V
        kv = cache[slots, 0]  # [S, L + R]
        s, h, dtype = kv.shape[0], self.num_heads, q_nope.dtype
        up = self.kv_b_proj(kv[:, : self.lora].to(dtype)).view(s, h, self.nope + self.v_dim)
        k = torch.cat([up[..., : self.nope], kv[:, None, self.lora :].to(dtype).expand(s, h, self.rope_dim)], -1)
        v = up[..., self.nope :].contiguous()  # [S, h, v]
        query = torch.cat([q_nope, q_pe], dim=-1)  # [T, h, nope + R]
        return ops.paged_attention(query, k, v, dataclasses.replace(batch, page_table=table), 1, self.scale)


def _positions(batch: ForwardBatch, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [S] int64: the cache slot of every position 0 .. seq_len_i - 1 of every sequence i, in
    order; table [B, max_seq_len] int32: row i = start_i + arange, start_i = the sum of the earlier
    sequences' lengths: a page table of page size 1 into a buffer laid out like slots). No host sync:
    the lengths' host copies size everything."""
    lens_cpu = [q + p for q, p in zip(batch.query_lens_cpu, batch.prefix_lens_cpu)]
    dev, total, longest = batch.page_table.device, sum(lens_cpu), max(lens_cpu)
    lens = batch.seq_lens.to(torch.int64)
    starts = torch.cumsum(lens, 0) - lens  # [B]
    seq = torch.repeat_interleave(torch.arange(len(lens_cpu), device=dev), lens, output_size=total)  # [S]
    pos = torch.arange(total, device=dev) - starts[seq]
    slots = batch.page_table[seq, pos // page_size].to(torch.int64) * page_size + pos % page_size
    table = (starts[:, None] + torch.arange(longest, device=dev)[None, :]).to(torch.int32)
    return slots, table
