"""Sampling: a pure, jittable generator over the compressed MLA cache.

    out = generate(graphdef, params, prompts_BP, lengths_B, jax.random.key(0), SamplingConfig(...))
    out.tokens [B, N], out.logprobs [B, N], out.lengths [B], out.done [B]

Shape key: B batch, P prompt (padded) length, N max_new_tokens, S = P + N cache length, L layers of a stack,
D hidden, N_h heads, H qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.

Prompts are right-padded to P; row b's prompt is prompts[b, :lengths[b]]. Prefill runs the model's blocks over
the prompts and fills the cache; then a `lax.while_loop` decodes one token per row per step, row b writing its
i-th new token at position lengths[b] + i, until every row has stopped or N tokens are out.

One model: prefill and decode run the model's own forward pieces (`Transformer.embed_tokens`, `Transformer.blocks`
-> `Block` -> `MLA` with a cache, `Transformer.mtp_input`, `Transformer.logits`). The cache (`model.Cache`) holds,
per layer and token, only what DeepSeek's inference code keeps in its "absorb" mode: the normalized KV latent c
and the rotated shared rope key, one row [c ; k_pe] of C + R = 576 values at V3 shape; `MLA` attends over it in
absorbed form (never expanding keys or values per head) or, as a check, expanded ("naive").

`SamplingConfig.decoder` picks the implementation of that step, one vocabulary (`DECODERS`):
    model      the model's modules (absorbed attention)
    naive      the model's modules, keys and values expanded from the cached latents (the check path)
    fused      `deepjax.infer.fast.fused`: the same step over weights folded once per call (W_uk absorbed into the
               query weights, concatenated projections, shared experts appended to the routed ones, routing
               without sorts), XLA only; one device
    pallas     fused, with the Pallas GPU kernels (`deepjax.infer.fast.kernels`, which of them: `kernel_set`)
    interpret  fused, with the Pallas kernels in Pallas' interpreter (tests)
    auto       pallas on one GPU, fused on one device of another backend, model under a multi-device mesh, with
               a caller's experts_fn, or above FUSED_DECODE_MAX_TOKENS rows a step (`resolve_decoder`)
The fused decoders raise an error naming the field for a config they do not implement (`fused.check_supported`);
tests/test_decode_contract.py holds every decoder to the full forward.

Log-probabilities. `logprobs[b, i]` is the log-probability of the sampled token under softmax(logits /
temperature), taken BEFORE top-k / top-p truncation (the truncated distribution is only used to draw). Greedy
(temperature 0) reports the log-probability under softmax(logits) (temperature 1). A trainer that recomputes
log_softmax(logits / temperature) at the same tokens gets the same numbers (tests/test_sampling.py). With
`record_support` (sampling-mask replay, DeepSeek-V3.2's "Keep Sampling Mask") they are instead under the truncated
distribution the token was drawn from, and `Output.support` holds that set's ids, so a trainer can compute its own
log-probs over the same set (`deepjax.rl.update.logprobs_from_logits`).

Under `sharding.use_mesh(mesh, rules)` the same code runs sharded: params in their training shardings, the
batch and the cache split over the batch axes, routed experts dispatched over `expert` as in training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax.held_jit import held_jit
from deepjax.infer.draw import categorical_by_cdf, cdf_draw, sample, truncate_logits  # (re-exported)
from deepjax.infer.fast import fused as DF
from deepjax.infer.fast import grouped as KG
from deepjax.infer.fast import kernels as KN
from deepjax.parallel import sharding
from deepjax.model.config import ModelConfig
from deepjax.schema import ConfigError, checker
from deepjax.model import Cache, Transformer, default_experts_fn
from deepjax.model import ops
from deepjax.model.layers import dtype_of
from deepjax.model.rope import rope_tables


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: off
    eos_ids: tuple[int, ...] = ()  # a row stops after sampling any of these (the EOS is kept in its output)
    pad_id: int = 0  # what fills a row's output after it stopped
    decoder: str = "auto"  # auto | model | naive | fused | pallas | interpret (the module docstring, DECODERS)
    cache_len: Optional[int] = None  # cache positions; None: prompt length + max_new_tokens, rounded up to 16
    unstack_layers: bool = True  # per-layer weight copies for the decode loop (faster on GPU; see unstack_layers)
    kernel_set: tuple[str, ...] = KN.KERNELS  # decoder pallas / interpret: which kernels (deepjax.infer.fast.kernels)
    # "kernel.setting=value" overrides of the kernels' settings (kernels.TUNING's defaults; bench/tune.py), e.g.
    # sampling.kernel_tuning=grouped.decode_min_tokens=256,route.num_warps=4
    kernel_tuning: tuple[str, ...] = ()
    mtp_draft: bool = False  # greedy only: the MTP module drafts one extra token per step, the main model checks it
    record_routes: bool = False  # Output.routes: the experts every token used in every MoE layer (routing replay)
    # Output.support: the token ids of the truncated set each token was drawn from (top-k, then top-p; sampling-mask
    # replay); the log-probs are then those of that truncated distribution. Needs top_k > 0 (the set's bound).
    record_support: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field (`sampling.FIELD=value: why`)."""
        fail = checker(self, "sampling")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            fail("max_new_tokens", "must be a positive int")
        if not self.temperature >= 0:
            fail("temperature", "must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if self.decoder not in DECODERS:
            fail("decoder", f"choose from {DECODERS}")
        if not isinstance(self.kernel_set, tuple) or not set(self.kernel_set) <= set(KN.KERNELS):
            fail("kernel_set", f"a tuple of some of {KN.KERNELS}")
        try:
            KN.tuning(self.kernel_tuning)
        except (TypeError, ValueError) as e:
            fail("kernel_tuning", str(e))
        if self.decoder == "pallas" and jax.default_backend() != "gpu":
            fail("decoder", f"the Pallas kernels compile for GPU only (backend: {jax.default_backend()}); "
                            "'interpret' runs them in Pallas' interpreter, 'fused' or 'auto' without them")
        if self.mtp_draft and self.temperature != 0:
            fail("mtp_draft", "drafting is greedy only: set sampling.temperature=0")
        if self.record_routes and self.mtp_draft:
            fail("record_routes", "not recorded with sampling.mtp_draft=True")
        if self.record_support and not (self.top_k > 0 and self.temperature > 0):
            fail("record_support", "the kept set is stored as top-k ids: needs sampling.top_k > 0 and "
                                   "sampling.temperature > 0")


def cache_length(sc: SamplingConfig, prompt_len: int) -> int:
    """The cache length for a prompt batch of padded length `prompt_len` (an error when sc.cache_len is too short)."""
    need = prompt_len + sc.max_new_tokens + int(sc.mtp_draft)  # a draft is written one position ahead
    # Rounded up to a multiple of 16: the Pallas attention kernel reads the cache in blocks of 16 rows or more.
    S = -(-need // 16) * 16 if sc.cache_len is None else sc.cache_len
    if need > S:
        raise ValueError(f"prompt length {prompt_len} + sampling.max_new_tokens={sc.max_new_tokens}"
                         f"{' + 1 (MTP draft)' if sc.mtp_draft else ''} exceed sampling.cache_len={S}")
    return S


CACHE_AXES = ("batch", "length", None)


def _layer_cache(cfg: ModelConfig, batch: int, length: int):
    """One layer's cache rows [B, S, C + R], zeroed, sharded over the batch axes."""
    shape = (batch, length, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return sharding.constrain(jnp.zeros(shape, dtype_of(cfg.dtype)), CACHE_AXES)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
    return Cache(tuple(_layer_cache(cfg, batch, length) for _ in range(cfg.n_dense_layers)),
                 tuple(_layer_cache(cfg, batch, length) for _ in range(cfg.n_moe_layers)))


def cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes the cache holds per token over all layers (MTP excluded)."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype_of(cfg.dtype)).itemsize


# Routed experts while decoding, on one device: which way reads the fewest bytes.
#   T*K <= E      gather the chosen experts' weights (batch 1 at V3 shape reads 8 of 256 experts)
#   T <= DENSE_DECODE_MAX_TOKENS   every expert on every token: nearly every expert is chosen by someone, so all
#                  weights are read anyway, and one dense batched matmul beats a sort + grouped matmul
#   otherwise      the prefill path (sorted grouped matmul)
# Under a mesh, decode uses the training dispatch (all-to-all over `expert`).
DENSE_DECODE_MAX_TOKENS = 128

# `decoder="auto"` takes the fused step on one device for up to this many tokens a step (past
# DENSE_DECODE_MAX_TOKENS its experts run every expert on every token, and it is still the faster step there): on an
# H100 at the bench preset (greedy, prompt 128, 256 new tokens) the fused Pallas step decodes 512 rows at 128.6k
# tokens/s against the modules' 113.3k, and 256 rows at 104.9k against 74.0k (docs/LOG.md, sessions 14 and 19).
# Larger steps are not measured; they keep the modules (sorted grouped matmuls).
FUSED_DECODE_MAX_TOKENS = 512


def prefill_experts_fn(cfg: ModelConfig):
    """Routed experts over the prompts in `prefill`: the model's own (`default_experts_fn`: tokamax grouped matmuls
    or the XLA block-sorted form on one device by `cfg.kernels`, the shard_map dispatch under a mesh). (With the
    Pallas decode kernels on, one device prefills with `prefill_fused`.)"""
    return default_experts_fn(cfg)


def decode_experts_fn(cfg: ModelConfig, n_tokens: int):
    """Routed experts for the module decoders ("model", "naive", or under a mesh) on n_tokens tokens."""
    if sharding.current() is not None:
        return default_experts_fn(cfg)
    if n_tokens > DENSE_DECODE_MAX_TOKENS:
        return prefill_experts_fn(cfg)
    fn = DF.experts_gathered if n_tokens * cfg.num_experts_per_tok <= cfg.n_routed_experts else DF.experts_all

    def experts(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID):  # the fused layout: contracted axis last
        return fn(x_TD, w_TK, idx_TK, jnp.swapaxes(jnp.concatenate([w_gate_EDI, w_up_EDI], -1), 1, 2),
                  jnp.swapaxes(w_down_EID, 1, 2))
    return experts


# ---------------------------------------------------------------------------------------------------------- prefill


def _fill(buf, values):
    return jax.lax.dynamic_update_slice(buf, values.astype(buf.dtype), (0,) * buf.ndim)


def _prompt_geometry(cfg, B: int, P: int, lengths_B):
    """(cos, sin, start_BP, valid_BP) of right-padded prompts: the padding after each prompt is its own document
    (`ops.doc_starts`), so it attends only to padding."""
    pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    valid_BP = pos_BP < lengths_B[:, None]
    cos, sin = rope_tables(cfg, pos_BP)
    return cos, sin, ops.doc_starts(valid_BP.astype(jnp.int32)), valid_BP


def _prompt_mask(valid_BP):
    """[B, P, P] causal mask within the prompt, padding to padding (the fused prefill's explicit mask)."""
    P = valid_BP.shape[1]
    return jnp.tril(jnp.ones((P, P), jnp.bool_))[None] & (valid_BP[:, :, None] == valid_BP[:, None, :])


def _routes_BTLK(per_layer):
    """[B, T, L_moe, K] int32 from each MoE layer's [B, T, K] routes (a list, or stacked [L, B, T, K]); None without
    MoE layers."""
    if per_layer is None or (isinstance(per_layer, (list, tuple)) and not per_layer):
        return None
    stacked = jnp.stack(per_layer) if isinstance(per_layer, (list, tuple)) else per_layer
    return jnp.moveaxis(stacked, 0, 2).astype(jnp.int32)


def _outputs(logits, cache, x, routes, return_hidden: bool, return_routes: bool):
    return (logits, cache) + ((x,) if return_hidden else ()) + ((routes,) if return_routes else ())


def prefill(model: Transformer, prompts_BP, lengths_B, cache: Cache, experts_fn, return_hidden: bool = False,
            return_routes: bool = False):
    """(logits [B, V] at each row's last prompt token, cache with positions [0, P) filled); with return_hidden,
    also the last hidden states [B, P, D] (before the final norm: what an MTP module reads); with return_routes,
    the experts each prompt token used [B, P, L_moe, K] (None without MoE layers). The model's own blocks over the
    prompts (`Transformer.blocks` with a cache)."""
    cfg = model.cfg
    B, P = prompts_BP.shape
    cos, sin, start_BP, valid_BP = _prompt_geometry(cfg, B, P, lengths_B)
    x, aux, cache = model.blocks(model.embed_tokens(prompts_BP), cos, sin, start_BP, valid_BP, experts_fn, cache)
    last_BD = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.logits(last_BD, model.norm)[:, 0]
    return _outputs(logits, cache, x, None if aux is None else _routes_BTLK(aux.routes), return_hidden,
                    return_routes)


# `prefill_fused`'s attention holds a layer's [B, N, P, P] float32 scores at once (`absorbed_attention`); past this
# many bytes the prompts prefill through the modules' flash attention instead (`fused_prefill_ok`).
FUSED_PREFILL_MAX_SCORE_BYTES = 4 << 30


def fused_prefill_ok(layers, n_tokens: int, prompt_len: int = 0) -> bool:
    """Whether `prefill_fused` runs on n_tokens prompt tokens (B x P, P = prompt_len): fused layers (`fuse_layers`)
    with the "grouped" kernels on (kernel_set; shapes `grouped.supported` takes), scores of at most
    FUSED_PREFILL_MAX_SCORE_BYTES, and on GPU few enough rows for their int32 offsets (`grouped.fits`; beyond
    these, `prefill`)."""
    blks = None if layers is None else (layers["moe_layers"] or layers["dense_layers"])
    if not blks or not isinstance(blks[0], dict) or not blks[0]["kernels"]["grouped"]:
        return False
    cfg = blks[0]["cfg"]
    if n_tokens * cfg.num_attention_heads * prompt_len * 4 > FUSED_PREFILL_MAX_SCORE_BYTES:
        return False
    X, A = cfg.n_routed_experts + cfg.n_shared_experts, cfg.num_experts_per_tok + cfg.n_shared_experts
    return blks[0]["kernels"]["grouped"] == "interpret" or KG.fits(n_tokens, A, X, cfg.hidden_size,
                                                                      cfg.moe_intermediate_size)


def prefill_fused(model: Transformer, layers: dict, prompts_BP, lengths_B, cache: Cache, return_hidden: bool = False,
                  return_routes: bool = False):
    """`prefill` with the decode step's fused weights (`fuse_layers`): absorbed attention over the prompt's own
    rows, and the routed experts as grouped matmuls that read each expert's weights in place (Pallas,
    `deepjax.infer.fast.grouped`), where `prefill`'s block-sorted path gathers a copy of the weights per block of
    rows. Same outputs as `prefill` up to rounding (tests/test_grouped.py)."""
    cfg = model.cfg
    B, P = prompts_BP.shape
    cos, sin, _, valid_BP = _prompt_geometry(cfg, B, P, lengths_B)
    mask_BPP = _prompt_mask(valid_BP)
    dt = dtype_of(cfg.dtype)
    x = jnp.take(model.embed[...].astype(dt), prompts_BP, axis=0)
    caches, routes = [list(c) for c in cache], []
    for i, name in enumerate(("dense_layers", "moe_layers")):
        for l, blk in enumerate(layers[name] or []):
            x, rows, r = DF.fused_block(blk, x, None, None, cos, sin, mask_BPP, prefill=True)
            caches[i][l] = _fill(caches[i][l], rows)
            routes += [] if r is None else [r]
    last_BD = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)
    logits = model.logits(last_BD, model.norm)[:, 0]
    cache = Cache(*(tuple(c) for c in caches))
    return _outputs(logits, cache, x, _routes_BTLK(routes), return_hidden, return_routes)


def _prefill(model, layers, prompts_BP, lengths_B, cache, prefill_fn, return_hidden=False, return_routes=False):
    if fused_prefill_ok(layers, prompts_BP.size, prompts_BP.shape[1]):
        return prefill_fused(model, layers, prompts_BP, lengths_B, cache, return_hidden, return_routes)
    return prefill(model, prompts_BP, lengths_B, cache, prefill_fn, return_hidden, return_routes)


# ----------------------------------------------------------------------------------------------------------- decode
# T query tokens per row (1 when sampling; 2 when verifying an MTP draft) at positions pos_B + [0, T).


def unstack_layers(model: Transformer, barrier: bool = True):
    """{"dense_layers": [layer module, ...], "moe_layers": [...]}: each scanned stack split into per-layer modules
    (copies of the weights). `generate` does this once per call, outside its decode loop: on GPU, a layer sliced
    out of a stacked weight inside the loop is copied at every step (measured: half the step time at batch 64 on
    the bench preset). Costs one extra copy of the stacked weights while generating. barrier=False leaves the
    slices free to fuse into what reads them (`fuse_layers`, whose own outputs pass a barrier)."""
    out = {}
    for name in ("dense_layers", "moe_layers"):
        stack = getattr(model, name)
        out[name] = None if stack is None else _layers_of(stack, barrier)
    return out


DECODERS = ("auto", "model", "naive", "fused", "pallas", "interpret")
FUSED_DECODERS = ("fused", "pallas", "interpret")


def resolve_decoder(sc: SamplingConfig, experts_fn=None, n_tokens: int = 1, one_device: Optional[bool] = None) -> str:
    """The decoder `sc.decoder` means here (never "auto"), for n_tokens rows x tokens per step. "auto" takes the
    fused step on one device with the default experts and at most FUSED_DECODE_MAX_TOKENS tokens a step, with the
    Pallas kernels on GPU; else the model's modules. A fused
    decoder named explicitly where it cannot run (a multi-device mesh, a caller's experts_fn) is an error.
    one_device: whether the step runs on one device (None: outside a `sharding.use_mesh` context)."""
    one_device = sharding.current() is None if one_device is None else one_device
    if sc.decoder != "auto":
        if sc.decoder in FUSED_DECODERS and not (one_device and experts_fn is None):
            raise ConfigError(f"sampling.decoder={sc.decoder!r}: the fused decoders run on one device with the "
                              "model's own experts (not under a multi-device mesh or with experts_fn); use "
                              "'model' or 'auto'")
        return sc.decoder
    if one_device and experts_fn is None and n_tokens <= FUSED_DECODE_MAX_TOKENS:
        return "pallas" if jax.default_backend() == "gpu" else "fused"
    return "model"


def kernel_mode(decoder: str):
    """How a fused decoder runs its Pallas kernels (`deepjax.infer.fast.kernels`): "gpu", "interpret" or None (XLA)."""
    return {"pallas": "gpu", "interpret": "interpret"}.get(decoder)


def attn_impl(decoder: str) -> str:
    """The MLA mode (`mla.ATTN_IMPLS`) of a decoder: the check path expands k and v, every other is absorbed."""
    return "naive" if decoder == "naive" else "absorbed"


def fuse_layers(model: Transformer, n_tokens: int = 1, kernels: Optional[str] = None, cache_len: int = 0,
                kernel_set=KN.KERNELS, tokens_per_row: int = 1, tuning: Optional[dict] = None):
    """Like `unstack_layers`, with each layer's weights fused for the one-device decode step on n_tokens tokens
    per step: a dict of arrays per layer (`fused.fuse_block`), made once per generate call."""
    dt = dtype_of(model.cfg.dtype)
    return {name: None if blks is None else
            [DF.fuse_block(b, dt, n_tokens, kernels, cache_len, kernel_set, tokens_per_row, tuning) for b in blks]
            for name, blks in unstack_layers(model, barrier=False).items()}


def use_fused(sc: SamplingConfig, experts_fn, n_tokens: int) -> bool:
    """Whether `generate` decodes with fused weights (`resolve_decoder`)."""
    return resolve_decoder(sc, experts_fn, n_tokens) in FUSED_DECODERS


def _decode_layers(model: Transformer, sc: SamplingConfig, experts_fn, n_tokens: int, cache_len: int,
                   tokens_per_row: int = 1):
    decoder = resolve_decoder(sc, experts_fn, n_tokens)
    if decoder in FUSED_DECODERS:
        return fuse_layers(model, n_tokens, kernel_mode(decoder), cache_len, sc.kernel_set, tokens_per_row,
                           KN.tuning(sc.kernel_tuning))
    return unstack_layers(model) if sc.unstack_layers else None


def _layers_of(stack, barrier: bool = True):
    """Per-layer modules over copies of the weights; with barrier, the copies pass an optimization barrier, else
    XLA:GPU sinks the slicing into the decode loop and copies each layer's weights at every step."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    keep = jax.lax.optimization_barrier if barrier else (lambda t: t)
    return [nnx.merge(graphdef, keep(jax.tree.map(lambda a: a[i], state))) for i in range(n)]


def _geometry(cfg, pos_B, T: int, S: int):
    pos_BT = pos_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    cos, sin = rope_tables(cfg, pos_BT)
    mask_BTS = jnp.arange(S)[None, None, :] <= pos_BT[:, :, None]
    return pos_BT, cos, sin, mask_BTS


def decode_tokens(model: Transformer, tokens_BT, pos_B, cache: Cache, experts_fn, attention: str = "absorbed",
                  layers: Optional[dict] = None, return_routes: bool = False):
    """(logits [B, T, V], hidden [B, T, D] before the final norm, cache) for T new tokens per row at positions
    pos_B + [0, T); with return_routes also the experts they used [B, T, L_moe, K] (None without MoE layers).
    `layers`: `unstack_layers(model)` or `fuse_layers(model)`, made once outside the caller's loop.

    The layers run as a Python loop with static indices, not a scan: a rolled loop inside the decode while_loop
    costs a device-to-host round trip per layer on GPU (4x slower at batch 1 on the bench preset)."""
    S = (cache.dense or cache.moe)[0].shape[1]
    B, T = tokens_BT.shape
    pos_BT, cos, sin, mask_BTS = _geometry(model.cfg, pos_B, T, S)
    x = model.embed_tokens(tokens_BT)
    layers = layers or unstack_layers(model)
    if _is_fused(layers):  # the fast implementation of the same step (deepjax.infer.fast.fused)
        caches, routes = [list(c) for c in cache], []
        for i, name in enumerate(("dense_layers", "moe_layers")):
            for l, blk in enumerate(layers[name] or []):
                x, caches[i][l], r = DF.fused_block(blk, x, caches[i][l], pos_BT, cos, sin, mask_BTS)
                routes += [] if r is None else [r]
        x, cache = DF.settle(x), Cache(*(tuple(c) for c in caches))  # (a fused block may leave its sum pending)
        routes = _routes_BTLK(routes)
    else:
        x, aux, cache = model.blocks(x, cos, sin, jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.bool_),
                                     experts_fn, cache, pos_BT, attention, layers)
        routes = None if aux is None else _routes_BTLK(aux.routes)
    out = (model.logits(x, model.norm), x, cache)
    return out + (routes,) if return_routes else out


def _is_fused(layers) -> bool:
    blks = None if layers is None else (layers["moe_layers"] or layers["dense_layers"])
    return bool(blks) and isinstance(blks[0], dict)


def decode_step(model: Transformer, tokens_B, pos_B, cache: Cache, experts_fn, attention: str = "absorbed",
                layers: Optional[dict] = None, return_routes: bool = False):
    """Logits [B, V] for one new token per row at positions pos_B, and the cache with that token written (with
    return_routes also the token's experts [B, 1, L_moe, K] or None)."""
    out = decode_tokens(model, tokens_B[:, None], pos_B, cache, experts_fn, attention, layers, return_routes)
    return (out[0][:, 0], out[2]) + ((out[3],) if return_routes else ())


# ------------------------------------------------------------------------------------------------- MTP drafting
# The first MTP module (V3 section 2.2) drafts the token after next from the main model's hidden state h_i and
# the embedding of t_{i+1}: its own block, with its own latent cache over the positions it has seen.


def mtp_prefill(model: Transformer, h_BPD, prompts_BP, lengths_B, first_B, kv_BSc, experts_fn):
    """The MTP module over the prompt: position i reads (h_i, t_{i+1}), the last prompt position reads the first
    sampled token. Returns (draft logits [B, V] for the token after it, the module's cache rows)."""
    cfg, mod = model.cfg, model.mtp[0]
    B, P = prompts_BP.shape
    cos, sin, start_BP, valid_BP = _prompt_geometry(cfg, B, P, lengths_B)
    pos = jnp.arange(P)[None]
    nxt = jnp.where(pos == (lengths_B - 1)[:, None], first_B[:, None], jnp.pad(prompts_BP[:, 1:], ((0, 0), (0, 1))))
    x, _, kv_BSc = mod.block(model.mtp_input(mod, h_BPD, nxt), cos, sin, start_BP, valid_BP, experts_fn, kv_BSc)
    last = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)
    return model.logits(last, mod.norm)[:, 0], kv_BSc


def mtp_decode(model: Transformer, h_BTD, next_BT, pos_B, kv_BSc, experts_fn, attention: str, block=None):
    """The MTP module on T positions per row (pos_B + [0, T)): draft logits [B, T, V] and its cache rows.
    `block`: the module's block fused (`fused.fuse_block`), when the caller made that once."""
    mod = model.mtp[0]
    B, T = next_BT.shape
    pos_BT, cos, sin, mask_BTS = _geometry(model.cfg, pos_B, T, kv_BSc.shape[1])
    x = model.mtp_input(mod, h_BTD, next_BT)
    if block is not None:
        x, kv_BSc, _ = DF.fused_block(block, x, kv_BSc, pos_BT, cos, sin, mask_BTS)
    else:
        x, _, kv_BSc = mod.block(x, cos, sin, jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.bool_), experts_fn,
                                 kv_BSc, pos_BT, attention)
    return model.logits(DF.settle(x), mod.norm), kv_BSc


class Output(NamedTuple):
    tokens: jax.Array  # [B, N] int32: new tokens; pad_id after a row stopped
    logprobs: jax.Array  # [B, N] float32: log-prob of each new token (0 after a row stopped)
    lengths: jax.Array  # [B] int32: new tokens per row, EOS included
    done: jax.Array  # [B] bool: the row stopped on an EOS (False: it ran out of max_new_tokens)
    drafts_proposed: Optional[jax.Array] = None  # [B] int32, with mtp_draft: MTP drafts checked by the main model
    drafts_accepted: Optional[jax.Array] = None  # [B] int32: of those, the ones equal to the main model's token
    # [B, S, L_moe, K] int16 (int32 past 32,768 experts: `routes_out`), with record_routes: the experts each token
    # fed to the model used in each MoE layer, at its position (prompt at [0, length), the i-th new token at
    # length + i, up to the row's last new token, which is never fed: -1 there and where nothing was recorded; past
    # a row's end, the routes of whatever the loop went on feeding it while other rows ran, or while a chunk of the
    # EOS check finished: `generate`; consumers mask them, as rl.update's routes placement does)
    routes: Optional[jax.Array] = None
    # [B, N, top_k] int32, with record_support: the ids of the truncated set each new token was drawn from (-1 past
    # the top-p cut and after a row stopped); logprobs are then under that set's renormalized distribution
    support: Optional[jax.Array] = None


def _is_eos(tok_B, eos_ids):
    if not eos_ids:
        return jnp.zeros(tok_B.shape, jnp.bool_)
    return jnp.any(tok_B[:, None] == jnp.asarray(eos_ids, jnp.int32)[None], axis=-1)


def _recording(model: Transformer, sc: SamplingConfig) -> bool:
    return sc.record_routes and model.cfg.n_moe_layers > 0


def start(model: Transformer, prompts_BP, lengths_B, key, sc: SamplingConfig, experts_fn=None):
    """`generate` up to its loop: (decode layers, cache, first token [B], its log-prob [B], key, routes, kept). The
    decode layers are the fused weights or per-layer modules the steps reuse (`_decode_layers`), or None. routes:
    with sc.record_routes, [B, S, L_moe, K] int32, the prompt tokens' experts at their positions and -1 elsewhere;
    else None. kept: with sc.record_support the first token's kept set [B, top_k] (`sample`); else None."""
    B, P = prompts_BP.shape
    S = cache_length(sc, P)
    cache = init_cache(model.cfg, B, S)
    layers = _decode_layers(model, sc, experts_fn, B, S)
    lengths_B = lengths_B.astype(jnp.int32)
    record = _recording(model, sc)
    out = _prefill(model, layers, prompts_BP.astype(jnp.int32), lengths_B, cache,
                   experts_fn or prefill_experts_fn(model.cfg), return_routes=record)
    logits, cache = out[:2]
    routes = None
    if record:
        valid = (jnp.arange(P)[None] < lengths_B[:, None])[:, :, None, None]
        routes = jnp.full((B, S) + out[2].shape[2:], -1, jnp.int32).at[:, :P].set(jnp.where(valid, out[2], -1))
    key, k0 = jax.random.split(key)
    tok, lp, *ids = sample(logits, k0, sc)
    return layers, cache, tok, lp, key, routes, (ids or [None])[0]


def advance(model: Transformer, layers, tok_B, pos_B, cache: Cache, key, sc: SamplingConfig, experts_fn=None,
            routes=None):
    """One step of `generate`'s loop: token tok_B enters the cache at pos_B; returns (next token, its log-prob,
    cache, key, routes, kept): routes (`start`'s) with tok_B's experts written at pos_B, when given; kept the next
    token's kept set with sc.record_support, else None."""
    decode_fn = experts_fn or decode_experts_fn(model.cfg, tok_B.shape[0])
    out = decode_step(model, tok_B, pos_B, cache, decode_fn, attn_impl(sc.decoder), layers,
                      return_routes=routes is not None)
    logits, cache = out[:2]
    if routes is not None:
        B, S, L, K = routes.shape
        routes = DF.write_rows(routes.reshape(B, S, L * K), pos_B[:, None], out[2].reshape(B, 1, L * K)).reshape(
            routes.shape)
    key, k = jax.random.split(key)
    tok, lp, *ids = sample(logits, k, sc)
    return tok, lp, cache, key, routes, (ids or [None])[0]


# The forward's weights that stay float32 whatever model.param_dtype is: the router's gate (its logits are float32,
# deepjax/model/moe.py) and the aux-loss-free bias.
FLOAT32_WEIGHTS = ("gate", "bias")


def compute_params(params, dtype: str):
    """params with every weight the forward casts to model.dtype where it is used already in model.dtype (all but
    FLOAT32_WEIGHTS): `generate` casts once per call instead of at every decode step. With float32 master weights
    (GRPO's policy) a step would otherwise read each weight in float32 and convert it: about 3x the bytes of a bf16
    step. The same values reach every matmul, so the samples do not change (tests/test_sampling.py)."""
    dt = dtype_of(dtype)

    def cast(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dt or any(n in FLOAT32_WEIGHTS for n in names):
            return x
        return x.astype(dt)
    return jax.tree_util.tree_map_with_path(cast, params)


# `generate` checks whether every row has ended once every this many steps (a divisor of max_new_tokens: their gcd)
# when the sampling has EOS ids. On an H200 (GRPO's 512 rows x 512 new tokens, `grpo_bench --sampler-alone`, docs/LOG.md
# session 27): 1.277 s a call against 1.292 s checking every step, and 1.283 s without EOS ids.
STOP_CHECK_EVERY = 16


def generate(graphdef, params, prompts_BP, lengths_B, key, sc: SamplingConfig, experts_fn=None) -> Output:
    """Samples up to sc.max_new_tokens per row (see the module docstring). Pure; `jit_generate` jits it."""
    B, P = prompts_BP.shape
    S = cache_length(sc, P)
    cfg = nnx.merge(graphdef, params).cfg
    model = nnx.merge(graphdef, compute_params(params, cfg.dtype))
    prefill_fn = experts_fn or prefill_experts_fn(cfg)
    lengths_B = lengths_B.astype(jnp.int32)
    if sc.mtp_draft:
        if not len(model.mtp):
            raise ValueError("sampling.mtp_draft=True needs an MTP module: model.num_nextn_predict_layers is 0")
        layers = _decode_layers(model, sc, experts_fn, 2 * B, S, tokens_per_row=2)
        return _generate_mtp(model, prompts_BP.astype(jnp.int32), lengths_B, sc, S, prefill_fn,
                             experts_fn or decode_experts_fn(cfg, 2 * B), layers)
    layers, cache, tok, lp, key, routes, ids = start(model, prompts_BP, lengths_B, key, sc, experts_fn)
    N = sc.max_new_tokens
    out_tok = jnp.full((B, N), sc.pad_id, jnp.int32)
    out_lp = jnp.zeros((B, N), jnp.float32)
    done = jnp.zeros((B,), jnp.bool_)
    n_new = jnp.zeros((B,), jnp.int32)
    out_ids = None if ids is None else jnp.full((B, N, sc.top_k), -1, jnp.int32)

    def cond(c):
        i, done = c[0], c[5]
        return (i < N) & ~jnp.all(done)

    def body(c):
        i, tok, lp, out_tok, out_lp, done, n_new, cache, key, routes, ids, out_ids = c
        active = ~done
        out_tok = out_tok.at[:, i].set(jnp.where(active, tok, sc.pad_id))
        out_lp = out_lp.at[:, i].set(jnp.where(active, lp, 0.0))
        if ids is not None:
            out_ids = out_ids.at[:, i].set(jnp.where(active[:, None], ids, -1))
        n_new = n_new + active.astype(jnp.int32)
        done = done | (active & _is_eos(tok, sc.eos_ids))
        tok, lp, cache, key, routes, ids = advance(model, layers, tok, lengths_B + i, cache, key, sc, experts_fn,
                                                   routes)
        return i + 1, tok, lp, out_tok, out_lp, done, n_new, cache, key, routes, ids, out_ids

    # With EOS ids the loop's end depends on the data: XLA:GPU then runs the condition and waits for it on the host
    # before each pass (a known trip count lets it queue the passes ahead; ~15 ms of a 512-step call on an H200), so
    # the condition is checked once every K steps, K dividing N: a chunk that runs past every row's end writes pads
    # and no counts, as the rows that ended earlier did all along (the routes at positions past a row's end hold
    # whatever it was fed, as before)
    K = math.gcd(N, STOP_CHECK_EVERY) if sc.eos_ids else 1
    steps = body if K == 1 else (lambda c: jax.lax.fori_loop(0, K, lambda _, c: body(c), c))
    carry = (jnp.int32(0), tok, lp, out_tok, out_lp, done, n_new, cache, key, routes, ids, out_ids)
    _, _, _, out_tok, out_lp, done, n_new, _, _, routes, _, out_ids = jax.lax.while_loop(cond, steps, carry)
    return Output(out_tok, out_lp, n_new, done, routes=routes_out(routes, model.cfg), support=out_ids)


def routes_out(routes, cfg):
    """Output.routes as returned: int16 while every expert id fits (ids 0 .. n_routed_experts - 1 <= 32,767; -1 marks
    no route), converted inside the sampler's program. They are its largest output and go to the host
    (text.complete): half the bytes, and no conversion after the call."""
    return routes if routes is None or cfg.n_routed_experts > 2**15 else routes.astype(jnp.int16)


def _generate_mtp(model: Transformer, prompts_BP, lengths_B, sc: SamplingConfig, S: int, prefill_fn, decode_fn,
                  layers):
    """Greedy decoding with MTP drafting: each step feeds [t_q, d] at positions [q, q+1], where t_q is the newest
    accepted token and d the MTP module's draft of the next one. The main model's choice a after t_q is always
    kept; when d == a the draft was right and the choice b after it is kept too (two tokens in one step). The
    MTP module then reads (h_q, a) and (h_{q+1}, b) and drafts the token after the newest accepted one. A
    rejected draft leaves stale cache entries at q+1 that the next step overwrites. The output is the plain
    greedy output (tests/test_sampling.py)."""
    cfg = model.cfg
    B, P = prompts_BP.shape
    N = sc.max_new_tokens
    mtp_block = (DF.fuse_block(model.mtp[0].block, dtype_of(cfg.dtype), 2 * B, kernel_mode(resolve_decoder(sc)), S,
                               sc.kernel_set, 2, KN.tuning(sc.kernel_tuning)) if _is_fused(layers) else None)
    impl = attn_impl(sc.decoder)
    cache = init_cache(cfg, B, S)
    logits, cache, h_BPD = _prefill(model, layers, prompts_BP, lengths_B, cache, prefill_fn, return_hidden=True)
    greedy = lambda lg: sample(lg, None, sc)[:2]  # noqa: E731  (temperature 0: no key needed)
    t, lp = greedy(logits)
    dlogits, mkv = mtp_prefill(model, h_BPD, prompts_BP, lengths_B, t, _layer_cache(cfg, B, S), prefill_fn)
    d = jnp.argmax(dlogits, -1).astype(jnp.int32)
    rows = jnp.arange(B)
    out_tok = jnp.full((B, N), sc.pad_id, jnp.int32).at[:, 0].set(t)
    out_lp = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)
    done = _is_eos(t, sc.eos_ids)
    n_new = jnp.ones((B,), jnp.int32)
    zeros = jnp.zeros((B,), jnp.int32)

    def cond(c):
        return ~jnp.all(c[5] | (c[6] >= N))

    def body(c):
        t, d, out_tok, out_lp, cache, done, n_new, mkv, proposed, accepted = c
        active = ~done & (n_new < N)
        q = lengths_B + n_new - 1  # position of t
        logits, h, cache = decode_tokens(model, jnp.stack([t, d], 1), q, cache, decode_fn, impl, layers)
        a, lpa = greedy(logits[:, 0])
        b, lpb = greedy(logits[:, 1])
        hit = d == a
        def put(out, n, when, value):  # out[row, n] = value where `when` (n < N wherever `when` holds)
            j = jnp.minimum(n, N - 1)
            return out.at[rows, j].set(jnp.where(when, value, out[rows, j]))

        out_tok, out_lp = put(out_tok, n_new, active, a), put(out_lp, n_new, active, lpa)
        done_a = active & _is_eos(a, sc.eos_ids)
        n_new = n_new + active.astype(jnp.int32)
        take_b = active & hit & ~done_a & (n_new < N)
        out_tok, out_lp = put(out_tok, n_new, take_b, b), put(out_lp, n_new, take_b, lpb)
        done = done | done_a | (take_b & _is_eos(b, sc.eos_ids))
        n_new = n_new + take_b.astype(jnp.int32)
        dl, mkv = mtp_decode(model, h, jnp.stack([a, b], 1), q, mkv, decode_fn, impl, mtp_block)
        drafts = jnp.argmax(dl, -1).astype(jnp.int32)
        t = jnp.where(take_b, b, a)
        d = jnp.where(take_b, drafts[:, 1], drafts[:, 0])
        proposed = proposed + active.astype(jnp.int32)
        accepted = accepted + (active & hit).astype(jnp.int32)
        return t, d, out_tok, out_lp, cache, done, n_new, mkv, proposed, accepted

    carry = (t, d, out_tok, out_lp, cache, done, n_new, mkv, zeros, zeros)
    _, _, out_tok, out_lp, _, done, n_new, _, proposed, accepted = jax.lax.while_loop(cond, body, carry)
    return Output(out_tok, out_lp, n_new, done, proposed, accepted)


def jit_generate(graphdef, params, prompts_BP, lengths_B, key, sc: SamplingConfig, experts_fn=None) -> Output:
    """`generate` under jax.jit (graphdef, sampling config and experts_fn static; retraced per mesh context)."""
    cache_length(sc, prompts_BP.shape[1])
    return _jitted(prompts_BP.shape[0])(graphdef, params, prompts_BP, lengths_B, key, sc, experts_fn,
                                          sharding.context_key())


# XLA:GPU compiler options for `jit_generate`. CONCURRENT: the command buffers (CUDA graphs) run kernels without a
# data dependency side by side instead of in program order, e.g. the routing kernel (`kernels.route` from the
# residual stream) beside the experts' gate/up matmul at batch 64 (on one H100, bench preset: 38,272 -> 39,350
# tokens/s at batch 64 when it was introduced, batch 1 unchanged; docs/LOG.md). XLA assigns temporaries less
# tightly under it (more memory for activations).
GPU_COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
# From this many rows a call, XLA's own dense products (the attention's projections, the head) go to cuBLAS instead
# of XLA's Triton GEMM fusions: at GRPO's 512 rows (bench preset, prompt 48, 512 new tokens, temperature 1, routes
# recorded, one H100) the sampler call took 1.368 s against 1.416 (docs/LOG.md session 26). Fewer rows were not
# timed, so they keep XLA's default (decode at batch 1 and 64 is issue 19's other target).
CUBLAS_MIN_ROWS = 256
_JITS: dict = {}


def compiler_options(backend: str, one_device: bool, rows: int) -> dict | None:
    """`jit_generate`'s XLA compiler options: on one GPU GPU_COMPILER_OPTIONS, with XLA's Triton GEMM fusions off
    from CUBLAS_MIN_ROWS rows; None elsewhere (measured on one GPU only, not with a mesh's collectives)."""
    if backend != "gpu" or not one_device:
        return None
    return {**GPU_COMPILER_OPTIONS, **({"xla_gpu_enable_triton_gemm": False} if rows >= CUBLAS_MIN_ROWS else {})}


def _jitted(rows: int = 1):
    """The jitted generate for the default backend and `compiler_options` (built on first use: the backend is not
    known at import). A `held_jit`: a GRPO update traced between two rollouts cannot evict the sampler's executable
    (deepjax/held_jit.py)."""
    options = compiler_options(jax.default_backend(), sharding.current() is None, rows)
    key = (jax.default_backend(), sharding.current() is None, tuple(sorted((options or {}).items())))
    if key not in _JITS:
        def f(graphdef, params, prompts_BP, lengths_B, key, sc, experts_fn, mesh_context):
            del mesh_context
            return generate(graphdef, params, prompts_BP, lengths_B, key, sc, experts_fn)
        _JITS[key] = held_jit(f, static_argnums=(0, 5, 6, 7), compiler_options=options)
    return _JITS[key]


def pad_prompts(prompts: list[list[int]], pad_id: int = 0, multiple: int = 8):
    """Right-padded int32 [B, P] (P rounded up to `multiple`, so prompt batches share compilations) and lengths."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = -(-max(len(p) for p in prompts) // multiple) * multiple
    out = np.full((len(prompts), P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, np.asarray([len(p) for p in prompts], np.int32)


__all__ = ["SamplingConfig", "DECODERS", "resolve_decoder", "kernel_mode", "attn_impl", "generate", "jit_generate",
           "routes_out", "prefill", "decode_step", "decode_tokens", "sample", "categorical_by_cdf", "cdf_draw",
           "truncate_logits", "mtp_prefill", "mtp_decode",
           "init_cache", "Cache", "Output", "cache_bytes_per_token", "pad_prompts", "cache_length", "decode_experts_fn",
           "fuse_layers", "unstack_layers", "use_fused", "prefill_fused", "fused_prefill_ok"]
