"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, docs/deepseek.md, MLA).

Shape key: B batch, T query length, S key length, D hidden, N heads, H qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, Q q_lora_rank, C kv_lora_rank, P = R/2.

  q      = W_qb(RMSNorm(W_qa x))  (or W_q x)        -> per head [q_nope (H) ; q_pe (R)]
  [c ; k_pe] = W_kva x;  c <- RMSNorm(c)             (C latent values + one R-dim rope key for all heads)
  [k_nope ; v] = W_kvb c                             -> per head
  scores = (q_nope . k_nope + rope(q_pe) . rope(k_pe)) * softmax_scale   (softmax in float32)

This is the "naive" (expanded) form used for training and prefill; the attention itself is
`ops.causal_attention` (a tokamax flash kernel or XLA, by `cfg.kernels`). The decode path that keeps only
[c ; rope(k_pe)] per token (the absorbed form) lives with the sampler.
"""

import jax.numpy as jnp
from flax import nnx

from deepjax.model import ops
from deepjax.model.config import ModelConfig
from deepjax.model.layers import Param, RMSNorm, dtype_of, normal_init
from deepjax.model.rope import apply_rope


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

    def __call__(self, x_BTD, cos_BTP, sin_BTP, start_BT):
        """start_BT: each position's document start (`ops.doc_starts`); attention is causal within documents."""
        cfg, dt = self.cfg, x_BTD.dtype
        H, N = cfg.qk_nope_head_dim, cfg.num_attention_heads
        q_nope_BTNH, q_pe_BTNR = self.query(x_BTD, cos_BTP, sin_BTP)
        c_BSC, k_pe_BSR = self.latent(x_BTD, cos_BTP, sin_BTP)
        kv_BSNK = jnp.einsum("bsc,cnk->bsnk", c_BSC, self.wkv_b[...].astype(dt))
        k_nope_BSNH, v_BSNV = kv_BSNK[..., :H], kv_BSNK[..., H:]
        k_pe_BSNR = jnp.broadcast_to(k_pe_BSR[:, :, None, :], (*k_pe_BSR.shape[:2], N, k_pe_BSR.shape[-1]))
        q_BTNK = jnp.concatenate([q_nope_BTNH, q_pe_BTNR], axis=-1)
        k_BSNK = jnp.concatenate([k_nope_BSNH, k_pe_BSNR], axis=-1)
        o_BTNV = ops.causal_attention(q_BTNK, k_BSNK, v_BSNV, start_BT, cfg.softmax_scale, cfg.kernels)
        return jnp.einsum("btnv,nvd->btd", o_BTNV, self.wo[...].astype(dt))
