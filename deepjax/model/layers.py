"""Small building blocks shared by the model files: variable types, init, RMSNorm, SwiGLU MLP.

Every parameter carries `axes`: logical axis names, one per dim, given where it is created. Stacked
(scanned) layers get a leading "layers" axis when shardings are derived (`deepjax.model.logical_axes`).

Shape key: B batch, T length, D hidden, F feed-forward width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.model.config import ModelConfig

Param = nnx.Param


class RouterBias(nnx.Variable):
    """The noaux_tc correction bias b: used for expert selection only, updated by the aux-loss-free rule
    (b_i += gamma sign(mean_load - load_i)), never by the optimizer; hence not an nnx.Param."""


def dtype_of(name: str):
    return jnp.dtype(name)


def normal_init(cfg: ModelConfig):
    """N(0, initializer_range) for every matrix, as DeepSeek's configs."""
    std = cfg.initializer_range

    def init(key, shape, dtype):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "embed"):
        self.eps = cfg.rms_norm_eps
        self.weight = Param(jnp.ones((dim,), dtype_of(cfg.param_dtype)), axes=(axis_name,))

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x, w, eps: float):
    """RMSNorm over the last axis: float32 statistics, the weight applied in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = w.astype(x.dtype)
    return w.reshape((1,) * (x.ndim - 1) + w.shape) * y.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: W_down(silu(W_gate x) * W_up x). Dense layers and shared experts."""

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
        D, pdt, init = cfg.hidden_size, dtype_of(cfg.param_dtype), normal_init(cfg)
        self.w_gate = Param(init(rngs.params(), (D, width), pdt), axes=("embed", "mlp"))
        self.w_up = Param(init(rngs.params(), (D, width), pdt), axes=("embed", "mlp"))
        self.w_down = Param(init(rngs.params(), (width, D), pdt), axes=("mlp", "embed"))

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        h_BTF = jax.nn.silu(x_BTD @ self.w_gate[...].astype(dt)) * (x_BTD @ self.w_up[...].astype(dt))
        return h_BTF @ self.w_down[...].astype(dt)
