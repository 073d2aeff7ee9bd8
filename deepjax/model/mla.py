"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, docs/deepseek.md, MLA).

Shape key: B batch, T query length, S key length, D hidden, N heads, H qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, Q q_lora_rank, C kv_lora_rank, P = R/2.

  q      = W_qb(RMSNorm(W_qa x))  (or W_q x)        -> per head [q_nope (H) ; q_pe (R)]
  [c ; k_pe] = W_kva x;  c <- RMSNorm(c)             (C latent values + one R-dim rope key for all heads)
  [k_nope ; v] = W_kvb c                             -> per head
  scores = (q_nope . k_nope + rope(q_pe) . rope(k_pe)) * softmax_scale   (softmax in float32)

Training and prefill use the expanded ("naive") form; the attention itself is `ops.causal_attention` (a tokamax
flash kernel or XLA, by `cfg.kernels`). With a cache (`MLA.__call__`'s kv_BSc: one layer's rows [c ; rope(k_pe)],
C + R = 576 values per token at V3 shape, as DeepSeek's inference/model.py keeps in its "absorb" mode), the new
tokens' rows are written into it and the queries attend over the cache in one of two modes (`ATTN_IMPLS`, DeepSeek's
`attn_impl`):

    absorbed  the key up-projection folded into the query and the value up-projection into the output, so the cache
              is never expanded per head:
                  q_c = q_nope . W_uk  [N, C];  score = [q_c ; q_pe] . [c_s ; k_pe_s] * softmax_scale
                  o_c = sum_s softmax(score)_s c_s;  out = (o_c . W_uv) . W_o
    naive     k and v expanded per head from the cached latents (the check path)

Decoding reuses this module (`deepjax.infer.sampling`); `deepjax.infer.fast.fused` is a faster implementation of
the same absorbed step over weights folded once per call.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.model import ops
from deepjax.model.config import ModelConfig
from deepjax.model.layers import Param, RMSNorm, dtype_of, normal_init
from deepjax.model.rope import apply_rope

ATTN_IMPLS = ("absorbed", "naive")
NEG = float(jnp.finfo(jnp.float32).min)


def write_rows(buf_BSX, pos_BT, new_BTX):
    """The T new tokens' cache rows written at their positions (for T = 1 a 1-D scatter: measured fastest on GPU)."""
    B, T = pos_BT.shape
    if T == 1:
        return buf_BSX.at[jnp.arange(B), pos_BT[:, 0]].set(new_BTX[:, 0].astype(buf_BSX.dtype))
    return buf_BSX.at[jnp.arange(B)[:, None], pos_BT].set(new_BTX.astype(buf_BSX.dtype))


def absorbed_attention(q_BTNc, kv_BSc, mask_BTS, w_uv_NVc, wo_DNV, scale: float):
    """Attention over the latent cache rows [c ; k_pe] for queries [q_c ; q_pe] (softmax in float32); the output
    projections contracted-axis-last: w_uv [N, V, C + R] (zero for the k_pe columns), wo [D, N, V]."""
    s_BNTS = jnp.einsum("btnc,bsc->bnts", q_BTNc, kv_BSc, preferred_element_type=jnp.float32)
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS * scale, NEG)
    p_BNTS = jax.nn.softmax(s_BNTS, axis=-1).astype(q_BTNc.dtype)
    o_BTNc = jnp.einsum("bnts,bsc->btnc", p_BNTS, kv_BSc)
    return jnp.einsum("btnv,dnv->btd", jnp.einsum("btnc,nvc->btnv", o_BTNc, w_uv_NVc), wo_DNV)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        H, V, pdt, init = cfg.qk_nope_head_dim, cfg.v_head_dim, dtype_of(cfg.param_dtype), normal_init(cfg)
        if cfg.q_lora_rank is not None:
            Q = cfg.q_lora_rank
            self.wq_a = Param(init(rngs.params(), (D, Q), pdt), axes=("embed", "q_lora"))
            self.q_norm = RMSNorm(Q, cfg, "q_lora")
            self.wq_b = Param(init(rngs.params(), (Q, N, H + R), pdt), axes=("q_lora", "heads", "head_dim"))
        else:
            self.wq = Param(init(rngs.params(), (D, N, H + R), pdt), axes=("embed", "heads", "head_dim"))
        self.wkv_a = Param(init(rngs.params(), (D, C + R), pdt), axes=("embed", "kv_lora"))
        self.kv_norm = RMSNorm(C, cfg, "kv_lora")
        self.wkv_b = Param(init(rngs.params(), (C, N, H + V), pdt), axes=("kv_lora", "heads", "head_dim"))
        self.wo = Param(init(rngs.params(), (N, V, D), pdt), axes=("heads", "head_dim", "embed"))

    def query(self, x_BTD, cos_BTP, sin_BTP):
        """(q_nope [B,T,N,H], rotated q_pe [B,T,N,R])."""
        cfg, dt = self.cfg, x_BTD.dtype
        if cfg.q_lora_rank is not None:
            x_BTQ, w_QNK = self.q_norm(x_BTD @ self.wq_a[...].astype(dt)), self.wq_b[...].astype(dt)
        else:
            x_BTQ, w_QNK = x_BTD, self.wq[...].astype(dt)
        H = cfg.qk_nope_head_dim
        # two products against the weight's column slices rather than slices of one [B, T, N, H + R] product, whose
        # backward would pad each slice's gradient back to H + R and add them (activation-sized passes)
        q_nope_BTNH = jnp.einsum("btq,qnh->btnh", x_BTQ, w_QNK[..., :H])
        return q_nope_BTNH, apply_rope(jnp.einsum("btq,qnr->btnr", x_BTQ, w_QNK[..., H:]), cos_BTP, sin_BTP)

    def latent(self, x_BTD, cos_BTP, sin_BTP):
        """What the decode cache keeps: normalized latent c [B,T,C] and rotated shared key k_pe [B,T,R]."""
        C = self.cfg.kv_lora_rank
        kv_BTc = x_BTD @ self.wkv_a[...].astype(x_BTD.dtype)
        return self.kv_norm(kv_BTc[..., :C]), apply_rope(kv_BTc[..., C:], cos_BTP, sin_BTP)

    def __call__(self, x_BTD, cos_BTP, sin_BTP, start_BT, kv_BSc=None, pos_BT=None, impl: str = "naive"):
        """start_BT: each position's document start (`ops.doc_starts`); attention is causal within documents.

        kv_BSc None (training): attention over the T tokens themselves; returns the output [B, T, D].
        kv_BSc [B, S, C + R], one layer's cache: the new tokens' rows [c ; rope(k_pe)] are written into it and the
        result is (output, cache). pos_BT None: the tokens are positions [0, T) (a prefill), attending over their
        own rows as in training. Else they are at pos_BT and attend over the cache rows s with
        start_BT <= s <= pos_BT, in mode `impl` (`ATTN_IMPLS`, the module docstring)."""
        cfg, dt = self.cfg, x_BTD.dtype
        H, N, C = cfg.qk_nope_head_dim, cfg.num_attention_heads, cfg.kv_lora_rank
        q_nope_BTNH, q_pe_BTNR = self.query(x_BTD, cos_BTP, sin_BTP)
        c_BTC, k_pe_BTR = self.latent(x_BTD, cos_BTP, sin_BTP)
        wkv_b = self.wkv_b[...].astype(dt)
        if kv_BSc is not None and pos_BT is not None:  # new tokens against the cache
            kv_BSc = write_rows(kv_BSc, pos_BT, jnp.concatenate([c_BTC, k_pe_BTR], -1))
            s_S = jnp.arange(kv_BSc.shape[1], dtype=jnp.int32)
            mask_BTS = (s_S[None, None] <= pos_BT[..., None]) & (s_S[None, None] >= start_BT[..., None])
            if impl == "absorbed":
                q_c = jnp.einsum("btnh,cnh->btnc", q_nope_BTNH, wkv_b[..., :H])
                w_uv = jnp.pad(jnp.einsum("cnv->nvc", wkv_b[..., H:]), ((0, 0), (0, 0), (0, cfg.qk_rope_head_dim)))
                out = absorbed_attention(jnp.concatenate([q_c, q_pe_BTNR], -1), kv_BSc, mask_BTS, w_uv,
                                         jnp.einsum("nvd->dnv", self.wo[...].astype(dt)), cfg.softmax_scale)
                return out, kv_BSc
            if impl != "naive":
                raise ValueError(f"MLA impl={impl!r}: choose from {ATTN_IMPLS}")
            c_BSC, k_pe_BSR = kv_BSc[..., :C], kv_BSc[..., C:]
        else:
            c_BSC, k_pe_BSR = c_BTC, k_pe_BTR
        k_nope_BSNH = jnp.einsum("bsc,cnh->bsnh", c_BSC, wkv_b[..., :H])  # two products, as in `query`
        v_BSNV = jnp.einsum("bsc,cnv->bsnv", c_BSC, wkv_b[..., H:])
        k_pe_BSNR = jnp.broadcast_to(k_pe_BSR[:, :, None, :], (*k_pe_BSR.shape[:2], N, k_pe_BSR.shape[-1]))
        q_BTNK = jnp.concatenate([q_nope_BTNH, q_pe_BTNR], axis=-1)
        k_BSNK = jnp.concatenate([k_nope_BSNH, k_pe_BSNR], axis=-1)
        if kv_BSc is not None and pos_BT is not None:
            o_BTNV = ops.masked_attention(q_BTNK, k_BSNK, v_BSNV, mask_BTS, cfg.softmax_scale)
        else:
            o_BTNV = ops.causal_attention(q_BTNK, k_BSNK, v_BSNV, start_BT, cfg.softmax_scale, cfg.kernels,
                                          cfg.attention)
        out = jnp.einsum("btnv,nvd->btd", o_BTNV, self.wo[...].astype(dt))
        if kv_BSc is None:
            return out
        if pos_BT is None:  # a prefill: the rows of positions [0, T)
            row = jnp.concatenate([c_BTC, k_pe_BTR], -1).astype(kv_BSc.dtype)
            kv_BSc = jax.lax.dynamic_update_slice(kv_BSc, row, (0, 0, 0))
        return out, kv_BSc
