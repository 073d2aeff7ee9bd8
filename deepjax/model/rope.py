"""Rotary position embedding on the decoupled rope dims, with DeepSeek's YaRN.

Shape key: B batch, T length, N heads, R rope dims (qk_rope_head_dim), P = R/2 rotated pairs.

DeepSeek rotates *adjacent* pairs (x[2i], x[2i+1]) by frequency i (complex form, `inference/model.py`);
HF transformers de-interleaves first. Both give the same q.k, and keeping DeepSeek's layout means the
rotated key we cache is laid out as in DeepSeek's inference code.
"""

import math

import jax.numpy as jnp
import numpy as np

from deepjax.model.config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [P] (float32). YaRN blends interpolation (freq / factor) and
    extrapolation (freq) with a ramp between dims low = floor(...) and high = ceil(...) (YaRN eq. 17-18)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return freq.astype(np.float32)

    def correction_dim(num_rotations):
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    # r = 1 at low dims (high frequencies) keeps the original frequency, r = 0 interpolates.
    keep = 1.0 - ramp
    return (freq / rs.factor * (1 - keep) + freq * keep).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's cos/sin scale: mscale(factor, mscale) / mscale(factor, mscale_all_dim); 1.0 for V2 and V3."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor, 1.0)


def rope_tables(cfg: ModelConfig, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, P] in float32 for integer positions."""
    inv_freq_P = jnp.asarray(yarn_inv_freq(cfg))
    angle_BTP = positions_BT.astype(jnp.float32)[..., None] * inv_freq_P[None, None, :]
    a = rope_attention_factor(cfg)
    return jnp.cos(angle_BTP) * a, jnp.sin(angle_BTP) * a


def apply_rope(x_BTNR: jnp.ndarray, cos_BTP: jnp.ndarray, sin_BTP: jnp.ndarray) -> jnp.ndarray:
    """Rotates adjacent pairs of the last dim; x may have a head axis ([B,T,N,R]) or not ([B,T,R])."""
    if x_BTNR.ndim == 4:
        cos_BTP, sin_BTP = cos_BTP[:, :, None, :], sin_BTP[:, :, None, :]
    x = x_BTNR.astype(jnp.float32).reshape(*x_BTNR.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos_BTP - x1 * sin_BTP, x0 * sin_BTP + x1 * cos_BTP], axis=-1)
    return out.reshape(x_BTNR.shape).astype(x_BTNR.dtype)
