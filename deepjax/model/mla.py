"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, docs/deepseek.md, MLA).

Shape key: B batch, T query length, S key length, D hidden, N heads, H qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, Q q_lora_rank, C kv_lora_rank, P = R/2.

  q      = W_qb(RMSNorm(W_qa x))  (or W_q x)        -> per head [q_nope (H) ; q_pe (R)]
  [c ; k_pe] = W_kva x;  c <- RMSNorm(c)             (C latent values + one R-dim rope key for all heads)
  [k_nope ; v] = W_kvb c                             -> per head
  scores = (q_nope . k_nope + rope(q_pe) . rope(k_pe)) * softmax_scale   (softmax in float32)

This is the "naive" (expanded) form used for training and prefill. The decode path that keeps only
[c ; rope(k_pe)] per token (the absorbed form) lives with the sampler.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.model.config import ModelConfig
from deepjax.model.layers import Param, RMSNorm, dtype_of, normal_init
from deepjax.model.rope import apply_rope


Q_CHUNK = 1024  # queries per block when T is longer: scores live as [B, N, Q_CHUNK, S], not [B, N, T, S]


def _attention_block(q_BTNK, k_BSNK, v_BSNV, mask_BTS, scale: float):
    s_BNTS = jnp.einsum("btnk,bsnk->bnts", q_BTNK, k_BSNK, preferred_element_type=jnp.float32) * scale
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, jnp.finfo(jnp.float32).min)
    p_BNTS = jax.nn.softmax(s_BNTS, axis=-1).astype(v_BSNV.dtype)
    return jnp.einsum("bnts,bsnv->btnv", p_BNTS, v_BSNV)


def attention(q_BTNK, k_BSNK, v_BSNV, mask_BTS, scale: float):
    """Softmax attention with the softmax in float32. mask True = may attend.

    Long sequences go through query blocks of Q_CHUNK under `lax.map` with each block rematerialized,
    so neither the forward nor the backward ever holds the full [B, N, T, S] score tensor (at V3 shape
    and T = 4096 that is 8.6 GB per sequence). Each query row's softmax is independent of the others,
    so the result is the same as one block."""
    T = q_BTNK.shape[1]
    if T <= Q_CHUNK or T % Q_CHUNK:
        return _attention_block(q_BTNK, k_BSNK, v_BSNV, mask_BTS, scale)
    n = T // Q_CHUNK
    q_nBCNK = jnp.moveaxis(q_BTNK.reshape(q_BTNK.shape[0], n, Q_CHUNK, *q_BTNK.shape[2:]), 1, 0)
    m_nBCS = jnp.moveaxis(mask_BTS.reshape(mask_BTS.shape[0], n, Q_CHUNK, -1), 1, 0)
    block = jax.checkpoint(lambda qm: _attention_block(qm[0], k_BSNK, v_BSNV, qm[1], scale))
    o_nBCNV = jax.lax.map(block, (q_nBCNK, m_nBCS))
    return jnp.moveaxis(o_nBCNV, 0, 1).reshape(*q_BTNK.shape[:3], v_BSNV.shape[-1])


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
            cq_BTQ = self.q_norm(x_BTD @ self.wq_a[...].astype(dt))
            q_BTNK = jnp.einsum("btq,qnk->btnk", cq_BTQ, self.wq_b[...].astype(dt))
        else:
            q_BTNK = jnp.einsum("btd,dnk->btnk", x_BTD, self.wq[...].astype(dt))
        H = cfg.qk_nope_head_dim
        return q_BTNK[..., :H], apply_rope(q_BTNK[..., H:], cos_BTP, sin_BTP)

    def latent(self, x_BTD, cos_BTP, sin_BTP):
        """What the decode cache keeps: normalized latent c [B,T,C] and rotated shared key k_pe [B,T,R]."""
        C = self.cfg.kv_lora_rank
        kv_BTc = x_BTD @ self.wkv_a[...].astype(x_BTD.dtype)
        return self.kv_norm(kv_BTc[..., :C]), apply_rope(kv_BTc[..., C:], cos_BTP, sin_BTP)

    def __call__(self, x_BTD, cos_BTP, sin_BTP, mask_BTS):
        cfg, dt = self.cfg, x_BTD.dtype
        H, N = cfg.qk_nope_head_dim, cfg.num_attention_heads
        q_nope_BTNH, q_pe_BTNR = self.query(x_BTD, cos_BTP, sin_BTP)
        c_BSC, k_pe_BSR = self.latent(x_BTD, cos_BTP, sin_BTP)
        kv_BSNK = jnp.einsum("bsc,cnk->bsnk", c_BSC, self.wkv_b[...].astype(dt))
        k_nope_BSNH, v_BSNV = kv_BSNK[..., :H], kv_BSNK[..., H:]
        k_pe_BSNR = jnp.broadcast_to(k_pe_BSR[:, :, None, :], (*k_pe_BSR.shape[:2], N, k_pe_BSR.shape[-1]))
        q_BTNK = jnp.concatenate([q_nope_BTNH, q_pe_BTNR], axis=-1)
        k_BSNK = jnp.concatenate([k_nope_BSNH, k_pe_BSNR], axis=-1)
        o_BTNV = attention(q_BTNK, k_BSNK, v_BSNV, mask_BTS, cfg.softmax_scale)
        return jnp.einsum("btnv,nvd->btd", o_BTNV, self.wo[...].astype(dt))
