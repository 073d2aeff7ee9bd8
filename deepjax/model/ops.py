"""The kernel-backed operations of the training and prefill forward, each with one XLA implementation (CPU, and the
reference the kernels are tested against) and one kernel implementation (tokamax: Mosaic GPU on sm80 / sm90 /
sm100, Mosaic TPU), chosen by `ModelConfig.kernels`:

    xla      XLA everywhere (the reference).
    tokamax  tokamax: its Mosaic kernels on GPU and TPU, its XLA implementations elsewhere (so CPU tests run this
             path's plumbing); an error if tokamax is not installed.
    auto     tokamax where it imports (it needs Python >= 3.12 and jax >= 0.11.1) on a platform of AUTO_TOKAMAX, whose
             kernels passed their tests there (GPU: tests/test_gpu_ops.py on an H100, docs/LOG.md 2026-12-06; not yet
             TPU); XLA otherwise.

`ModelConfig.attention` overrides the choice for the causal attention alone: auto (what `kernels` picks), xla,
tokamax, or cudnn (GPU only: cuDNN's flash attention through jax's packed-segments layout, `_cudnn_causal`; rows
with more than CUDNN_MAX_DOCS documents take tokamax's kernel instead, decided at run time).

Shape key: B batch, T queries, S keys, N heads, K qk head dim, V v head dim (K != V in MLA), D hidden,
G groups (experts), M rows.

The ops:
    causal_attention   softmax attention, causal within each document of a packed row. A document is a maximal
                       run of equal segment ids; each query t attends to keys [doc_start[t], t]. The kernel gets
                       doc_start as tokamax's `k_start` ([B, T] int32) and skips the key blocks outside it (a batch
                       of one document per row takes its plain causal kernel, chosen at run time:
                       `one_document_per_row`); the XLA path builds each query block's mask from the same iota
                       compare. Neither holds a [B, T, S] mask, and the kernel never holds [B, N, T, S] scores.
                       cuDNN gets each row's documents as segments (`doc_segments`: lengths and start offsets).
    grouped_matmul     `lax.ragged_dot` semantics (rows sorted by group, group g's rows times w[g]). On GPU: tokamax's
                       Mosaic kernels for the output and the input gradient (against the transposed weights), and
                       the weight gradient per group from `gmm_grad.grouped_dw` (a Pallas kernel: tokamax's bf16
                       one is wrong on the H200), so no FLOP is spent on a group a row is not in. (XLA's own
                       `ragged_dot` on CPU and GPU multiplies every row by every group: the model's XLA path is
                       `moe.routed_experts_blocked` instead.)
    lm_head_ce         the LM head and cross-entropy over token chunks with the gradient computed chunk by chunk
                       in the forward: [B, T, V] float32 logits never exist, forward or backward.
    lm_head_logprobs   the LM head's log-probs of given tokens and its entropy over token chunks (GRPO's policy
                       log-probs): no [B, T, V] float32 either; the backward reuses the forward's 16-bit logits
                       (up to KEEP_LOGITS_MAX_BYTES a device) or recomputes each chunk's.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp

from deepjax.model import gmm_grad
from deepjax.model.config import ATTENTION_KERNELS, KERNELS
from deepjax.parallel import sharding
from deepjax.schema import bad

Q_BLOCK = 1024  # XLA attention: queries per block when T is longer (scores live as [B, N, Q_BLOCK, S])
CE_CHUNK_TOKENS = 4096  # lm_head_ce: rows x chunk tokens per step on each device ([4096, V] float32 logits at a time)


@functools.cache
def _tokamax():
    try:
        import tokamax  # lazy on purpose: tokamax needs Python >= 3.12 and jax >= 0.11.1; CPU CI has neither
    except ImportError:
        return None
    return tokamax


def platform() -> str:
    """The platform the current trace compiles for: the active mesh's devices, else the default backend (so a
    compile for a TPU topology on a CPU host picks the TPU kernels)."""
    ctx = sharding.current()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


GPU_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)  # what tokamax's Mosaic GPU kernels multiply
# Platforms where kernels=auto takes tokamax. A platform joins once its kernel tests pass there: GPU did on an H100
# (tests/test_gpu_ops.py: grouped matmul and packed attention against float64 / float32 references, the bench
# preset's gradients as close to the float32 reference as XLA's own bf16 path; docs/LOG.md 2026-12-06). TPU has
# compiled (deepjax.train.compile_check) but not run: there auto is XLA and kernels=tokamax opts in.
AUTO_TOKAMAX = frozenset({"gpu"})


def resolve(kernels: str, dtype=None) -> str:
    """'xla' or 'tokamax' for a `ModelConfig.kernels` value, on the current platform, for operands of `dtype`.
    auto takes tokamax on the platforms of AUTO_TOKAMAX (on GPU for bf16 / f16 operands only: its Mosaic GPU kernels
    take no float32)."""
    if kernels not in KERNELS:
        raise ValueError(f"ModelConfig.kernels={kernels!r}: choose from {KERNELS}")
    if kernels == "xla":
        return "xla"
    on_gpu = platform() in ("gpu", "cuda")
    dtype_ok = dtype is None or not on_gpu or jnp.dtype(dtype) in GPU_KERNEL_DTYPES
    if kernels == "tokamax":
        if _tokamax() is None:
            raise ImportError("ModelConfig.kernels='tokamax': tokamax is not installed (it needs Python >= 3.12 "
                              "and jax >= 0.11.1; pip install deepjax on such a Python installs it)")
        if not dtype_ok:
            raise ValueError(f"ModelConfig.kernels='tokamax': tokamax's GPU kernels take bfloat16 or float16, not "
                             f"{jnp.dtype(dtype).name} (set model.dtype=bfloat16, or kernels=auto / xla)")
        return "tokamax"  # on CPU: tokamax's XLA implementations (tests)
    auto_ok = ("gpu" if on_gpu else platform()) in AUTO_TOKAMAX
    return "tokamax" if auto_ok and dtype_ok and _tokamax() is not None else "xla"


def _impl(op: str) -> str:
    """tokamax's implementation of `op` ("attention" or "ragged_dot") on this platform: its Mosaic kernels on GPU
    and TPU; elsewhere (tests on CPU) its XLA reference, so the tokamax path's plumbing runs everywhere."""
    p = platform()
    if p in ("gpu", "cuda"):
        return "mosaic_gpu"
    if p == "tpu":
        return "mosaic_tpu"
    return "xla"


# ---- attention ----------------------------------------------------------------------------------

def doc_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T] int32: the first position of each position's document (a maximal run of equal segment ids)."""
    B, T = segment_ids_BT.shape
    t_T = jnp.arange(T, dtype=jnp.int32)
    new_BT = jnp.concatenate([jnp.ones((B, 1), jnp.bool_), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new_BT, t_T[None], 0), axis=1)


def _attend(q_BTNK, k_BSNK, v_BSNV, mask_BTS, scale: float):
    s_BNTS = jnp.einsum("btnk,bsnk->bnts", q_BTNK, k_BSNK, preferred_element_type=jnp.float32) * scale
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, jnp.finfo(jnp.float32).min)
    p_BNTS = jax.nn.softmax(s_BNTS, axis=-1).astype(v_BSNV.dtype)
    return jnp.einsum("bnts,bsnv->btnv", p_BNTS, v_BSNV)


def _by_query_blocks(block, q_BTNK, per_query_BT, V: int):
    """block(q_BCNK, per_query_BC, t0) over query blocks of Q_BLOCK under `lax.map`, each block rematerialized, when
    T is a longer multiple of it: neither the forward nor the backward holds the [B, N, T, S] scores (at V3 shape and
    T = 4096 that is 8.6 GB per sequence). Each query row's softmax is its own, so the result is one block's."""
    B, T = q_BTNK.shape[:2]
    if T <= Q_BLOCK or T % Q_BLOCK:
        return block(q_BTNK, per_query_BT, 0)
    n = T // Q_BLOCK
    split = lambda a: jnp.moveaxis(a.reshape(B, n, Q_BLOCK, *a.shape[2:]), 1, 0)  # noqa: E731
    o_nBCNV = jax.lax.map(jax.checkpoint(lambda a: block(*a)),
                          (split(q_BTNK), split(per_query_BT), jnp.arange(n, dtype=jnp.int32) * Q_BLOCK))
    return jnp.moveaxis(o_nBCNV, 0, 1).reshape(*q_BTNK.shape[:3], V)


def masked_attention(q_BTNK, k_BSNK, v_BSNV, mask_BTS, scale: float):
    """Softmax attention (softmax in float32) under an explicit mask, True = may attend: the sampler's prefill
    against a cache (S != T). XLA, in query blocks (`_by_query_blocks`)."""
    return _by_query_blocks(lambda q, m, t0: _attend(q, k_BSNK, v_BSNV, m, scale), q_BTNK, mask_BTS,
                            v_BSNV.shape[-1])


def _xla_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale: float):
    s_S = jnp.arange(k_BSNK.shape[1], dtype=jnp.int32)

    def block(q_BCNK, start_BC, t0):
        t_C = t0 + jnp.arange(q_BCNK.shape[1], dtype=jnp.int32)
        mask_BCS = (s_S[None, None] <= t_C[None, :, None]) & (s_S[None, None] >= start_BC[:, :, None])
        return _attend(q_BCNK, k_BSNK, v_BSNV, mask_BCS, scale)

    return _by_query_blocks(block, q_BTNK, start_BT, v_BSNV.shape[-1])


# tokamax 0.0.17's Hopper attention backward pads the head dim to a multiple of 64 (its forward: of 16). For these
# widths it pads to the value instead: MLA's q / k at the bench preset are 64 + 32 = 96 wide, which that pad makes
# 128 (a third more matmul work in both backward kernels, and a pad and slice of q, k, dq, dk). Measured on an H100
# (bench/attention_tune.py --impls --impl-list tokamax_pad128 tokamax --docs 1, docs/LOG.md session 21): forward +
# backward 1,174 -> 950 us at B 8 x T 2048, 3,331 -> 3,048 us at B 2 x T 8192, the same errors against float32.
# Empty: tokamax's own pad everywhere.
TOKAMAX_BWD_HEAD_PAD = {96: 96}


def _pad_head_to(shape_lib, widths: dict):
    """shape_lib.pad_to_next_multiple_of, except that a head-dim pad to a multiple of 64 of an array whose last dim
    is a key of `widths` pads it to that value (no pad when they are equal)."""
    def pad(x, multiple, axis=0, pad_value=0):
        if multiple == 64 and axis == -1 and x.shape[-1] in widths:
            width = widths[x.shape[-1]]
            if width == x.shape[-1]:
                return x
            return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=pad_value)
        return shape_lib.pad_to_next_multiple_of(x, multiple, axis, pad_value=pad_value)
    return pad


def _tokamax_backward_head_pad():
    """Puts TOKAMAX_BWD_HEAD_PAD into tokamax's sm90 attention backward (its module's `shape_lib`, whose head-dim
    pad is its only multiple-of-64 pad), or tokamax's own module back when it is empty. Called as `_tokamax_causal`
    is traced: the backward kernel is traced after it, with the widths current then. A tokamax without that
    module is left as it is."""
    try:
        from tokamax._src import shape as shape_lib  # lazy on purpose: see _tokamax
        from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_kernel_sm90 as vk  # lazy on purpose: same
    except ImportError:
        return
    widths = dict(TOKAMAX_BWD_HEAD_PAD)
    if not widths:
        vk.shape_lib = shape_lib
        return
    if getattr(vk.shape_lib, "deepjax_head_pad", None) != widths:
        vk.shape_lib = types.SimpleNamespace(**{**vars(shape_lib), "deepjax_head_pad": widths,
                                                "pad_to_next_multiple_of": _pad_head_to(shape_lib, widths)})


# tokamax's Mosaic GPU attention kernel configs (None: tokamax's heuristics: forward block_q 64, block_kv 128; backward
# 64 x 64 blocks in both kernels, 2 stages, 2 compute warpgroups). FWD: fields of its sm90 `Config` (block_q,
# block_kv, num_stages, persistent); BWD: fields of its vjp `Config` (block_q_dkv, block_kv_dkv, block_q_dq,
# block_kv_dq, num_stages, compute_wgs). Hopper (sm90) configs: tokamax runs its sm90 kernel for them.
# bench/attention_tune.py sweeps both on the step's shapes.
TOKAMAX_ATTENTION_FWD_CONFIG: dict | None = None
TOKAMAX_ATTENTION_BWD_CONFIG: dict | None = None


def _tokamax_attention_op(impl: str):
    """tokamax's attention implementation `impl`, on Mosaic GPU with TOKAMAX_ATTENTION_FWD_CONFIG /
    TOKAMAX_ATTENTION_BWD_CONFIG where either is set."""
    from tokamax._src.ops.attention import api  # lazy on purpose: see _tokamax; pinned in pyproject
    fwd, bwd = TOKAMAX_ATTENTION_FWD_CONFIG, TOKAMAX_ATTENTION_BWD_CONFIG
    if impl != "mosaic_gpu" or (fwd is None and bwd is None):
        return api.IMPLEMENTATIONS[impl]
    from tokamax._src.ops.attention import (  # lazy on purpose: see _tokamax; Mosaic GPU only where configured
        pallas_mosaic_gpu as fa, pallas_mosaic_gpu_kernel_sm90 as sm90, pallas_mosaic_gpu_vjp as vjp,
        pallas_mosaic_gpu_vjp_common as vjpc)

    def config(cls, fields, name):
        try:
            return None if fields is None else cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"deepjax.model.ops.{name}={fields!r}: not a {cls.__module__}.Config: {e}")
    return fa.PallasMosaicGpuFlashAttention(
        config=config(sm90.Config, fwd, "TOKAMAX_ATTENTION_FWD_CONFIG"),
        vjp=vjp.PallasMosaicGpuFlashAttentionVjp(config=config(vjpc.Config, bwd, "TOKAMAX_ATTENTION_BWD_CONFIG")))


def _tokamax_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale: float, single_doc_branch: bool = True):
    # tokamax's public dot_product_attention takes only a boolean [B, N, T, S] mask; its Mask type (k_start per
    # query) is what its kernels take, so the op is called through its implementation table.
    from tokamax._src.ops.attention import base  # lazy on purpose: see _tokamax; pinned in pyproject

    _tokamax_backward_head_pad()
    op = _tokamax_attention_op(_impl("attention"))

    q_sharding = None
    ctx = sharding.current()
    if ctx is not None:
        mesh, rules = ctx
        q_sharding = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "length", "heads", None), rules, mesh))

    def call(mask, q_BTNK, k_BSNK, v_BSNV):
        return op(q_BTNK, k_BSNK, v_BSNV, mask=mask, logits_scale=scale, q_sharding=q_sharding)

    docs = functools.partial(call, base.Mask(k_start=start_BT[:, None, :], is_causal=True))
    # tokamax broadcasts its mask by implicit rank promotion (the cond's JVP traces its branches again, inside)
    with jax.numpy_rank_promotion("allow"):
        if not single_doc_branch:
            return docs(q_BTNK, k_BSNK, v_BSNV)
        # One document per row (every start 0) needs the causal mask alone. tokamax's backward applies k_start on
        # every block it visits (a load and a select per block, never a skipped block), so that case takes the
        # plain causal kernel, decided at run time: packed rows still get their documents.
        return jax.lax.cond(one_document_per_row(start_BT), functools.partial(call, base.Mask(is_causal=True)),
                            docs, q_BTNK, k_BSNK, v_BSNV)


def one_document_per_row(start_BT: jax.Array) -> jax.Array:
    """bool []: whether every row of `doc_starts`' [B, T] document starts is a single document (every start 0), where
    the causal mask alone is the documents' mask. A row ending in padding (segment 0) has a second document."""
    return jnp.all(start_BT == 0)


def doc_segments(start_BT: jax.Array, max_docs: int):
    """Each row's documents as cuDNN's packed layout takes them, from `doc_starts`' [B, T] document starts (position
    t starts a document iff start_BT[b, t] == t): (seqlen_BM, offsets_BM1, n_docs_B), M = max_docs.
    seqlen_BM [B, M] int32: the length of each of the row's first M documents, -1 past its last one;
    offsets_BM1 [B, M + 1] int32: their start positions, then -1 (3 documents at 0, 170, 340 and M = 3:
    [0, 170, 340, -1]); n_docs_B [B] int32: the row's number of documents. Where n_docs > M the segments cover only
    the first M documents (the last one's length runs to the next document's start): the caller must not use them."""
    B, T = start_BT.shape
    t_T = jnp.arange(T, dtype=jnp.int32)
    first_BT = start_BT == t_T[None]
    n_docs_B = jnp.sum(first_BT, axis=1, dtype=jnp.int32)
    # the first M + 1 starts, padded with T: document m runs from starts[m] to starts[m + 1]
    starts_BM1 = jax.vmap(lambda f: jnp.nonzero(f, size=max_docs + 1, fill_value=T)[0])(first_BT).astype(jnp.int32)
    live_BM = jnp.arange(max_docs, dtype=jnp.int32)[None] < n_docs_B[:, None]
    seqlen_BM = jnp.where(live_BM, starts_BM1[:, 1:] - starts_BM1[:, :-1], -1)
    offsets_BM1 = jnp.concatenate([jnp.where(live_BM, starts_BM1[:, :-1], -1), jnp.full((B, 1), -1, jnp.int32)], 1)
    return seqlen_BM, offsets_BM1, n_docs_B


CUDNN_MAX_DOCS = 16  # cuDNN's packed attention: segments per row (more in some row: _cudnn_causal's fallback)
# Packed segments with K != V: jax scales q_offsets and kv_offsets by N x the *query's* head dim, and XLA's cuDNN graph
# gives V kv_offsets and O q_offsets (openxla/xla cuda_dnn.cc, GetCudnnFlashAttentionOperationGraph), so V's and O's
# segment offsets would be in K's units. So the narrower head dim is zero-padded to the wider one (exact: zero columns
# add nothing to q.k and give zero output columns, sliced off), at (K - V) / (K + V) more flops (a fifth at K 96,
# V 64). cuDNN's own K != V path, unpadded, was measured on an H100 (jax 0.11.2, docs/LOG.md session 18): wrong
# output and NaN gradients with one document per row, CUDA_ERROR_ILLEGAL_INSTRUCTION with four; it is not offered.


def _cudnn_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale: float):
    """Causal attention within documents by cuDNN's flash attention (GPU, bf16 / f16), each row's documents as packed
    segments (`doc_segments`) under a padding-causal mask: causal within each segment. K != V: the narrower head dim
    is zero-padded to the wider one (see above). A batch where some row has more than M = min(CUDNN_MAX_DOCS, T)
    documents takes tokamax's kernel (XLA without tokamax) under `lax.cond`, so a row's documents are never silently
    merged. On an H100 (docs/LOG.md session 18) it is slower than tokamax's kernel with one document per row (fwd +
    bwd 1,732 against 1,244 us at B 8 x T 2048 x 16 heads) and faster with four (983 against 1,111 us)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa  # lazy on purpose: private, GPU-only
    except ImportError as e:
        raise RuntimeError(f"model.attention=cudnn: jax {jax.__version__} has no cuDNN attention module "
                           f"(jax._src.cudnn.fused_attention_stablehlo: {e}); use model.attention=auto / tokamax / "
                           f"xla") from e
    T, K, V = q_BTNK.shape[1], q_BTNK.shape[-1], v_BSNV.shape[-1]
    M = min(CUDNN_MAX_DOCS, T)

    def widen(a, width):  # zero columns up to `width` on the head dim
        return jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1])))

    def call(q_BTNK, k_BSNK, v_BSNV, **segments):
        H = max(K, V)
        o = fa.dot_product_attention(widen(q_BTNK, H), widen(k_BSNK, H), widen(v_BSNV, H), scale=scale,
                                     qkv_layout="BTNH", **segments)
        return o[..., :V]

    if M == 1:  # one position per row: one document
        return call(q_BTNK, k_BSNK, v_BSNV, mask_type=fa.MaskType.CAUSAL)

    seqlen_BM, offsets_BM1, n_docs_B = doc_segments(start_BT, M)

    def cudnn(q_BTNK, k_BSNK, v_BSNV):
        return call(q_BTNK, k_BSNK, v_BSNV, q_seqlen=seqlen_BM, kv_seqlen=seqlen_BM, q_offsets=offsets_BM1,
                    kv_offsets=offsets_BM1, mask_type=fa.MaskType.PADDING_CAUSAL)

    def fallback(q_BTNK, k_BSNK, v_BSNV):
        f = _tokamax_causal if _tokamax() is not None else _xla_causal
        return f(q_BTNK, k_BSNK, v_BSNV, start_BT, scale).astype(q_BTNK.dtype)

    return jax.lax.cond(jnp.max(n_docs_B) <= M, cudnn, fallback, q_BTNK, k_BSNK, v_BSNV)


def causal_attention(q_BTNK, k_BSNK, v_BSNV, start_BT, scale: float, kernels: str = "auto", attention: str = "auto"):
    """Causal attention within documents: query t attends to keys doc_start[t]..t (`doc_starts`), softmax in float32.
    T == S (training and prefill from position 0). attention (`ModelConfig.attention`): auto takes what `kernels`
    resolves to; xla / tokamax / cudnn that implementation."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"ModelConfig.attention={attention!r}: choose from {ATTENTION_KERNELS}")
    if attention == "cudnn":
        if platform() not in ("gpu", "cuda"):
            raise bad("model.attention", attention, f"cuDNN attention runs on CUDA GPUs only, and this program is "
                      f"for {platform()} (use model.attention=auto / xla / tokamax)")
        if jnp.dtype(q_BTNK.dtype) not in GPU_KERNEL_DTYPES:
            raise bad("model.attention", attention, f"cuDNN attention takes bfloat16 or float16, not "
                      f"{jnp.dtype(q_BTNK.dtype).name} (set model.dtype=bfloat16)")
        ctx = sharding.current()
        if ctx is not None and ctx[0].devices.size > 1:  # the segments' sharding is not tied to q's rows
            raise bad("model.attention", attention, f"cuDNN attention runs on one device for now, and this mesh "
                      f"has {ctx[0].devices.size} (use model.attention=auto / tokamax)")
        return _cudnn_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale)
    impl = "xla" if attention == "xla" else resolve(kernels if attention == "auto" else attention, q_BTNK.dtype)
    if impl == "tokamax":
        if platform() == "tpu":  # tokamax's TPU attention takes no per-query k_start: jax's splash kernel
            return splash_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale)
        return _tokamax_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale)
    return _xla_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale)


def splash_causal(q_BTNK, k_BSNK, v_BSNV, start_BT, scale: float, block: int = 512, interpret: bool = False):
    """Causal attention within documents on TPU: jax's splash attention (the block-sparse Mosaic TPU kernel MaxText
    uses), with a causal mask and each token's document start as its segment id (for keys at or before the query,
    "same document" and "at or after the query's document start" are the same condition, documents being
    contiguous). Under a mesh it runs per shard of batch and heads (shard_map). interpret: Pallas' interpreter,
    for tests on CPU."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # lazy on purpose: TPU
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # lazy on purpose: TPU

    def local(q_BTNK, k_BSNK, v_BSNV, start_BT):
        T, N, S = q_BTNK.shape[1], q_BTNK.shape[2], k_BSNK.shape[1]
        bq, bkv = min(block, T), min(block, S)
        sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
        mask = sm.MultiHeadMask([sm.CausalMask((T, S)) for _ in range(N)])
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
        heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, T, N, K] -> [B, N, T, K]
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
            heads_first(q_BTNK * jnp.asarray(scale, q_BTNK.dtype)), heads_first(k_BSNK), heads_first(v_BSNV),
            start_BT)
        return heads_first(o).astype(q_BTNK.dtype)

    ctx = sharding.current()
    if ctx is None:
        return local(q_BTNK, k_BSNK, v_BSNV, start_BT)
    mesh, rules = ctx
    spec4 = sharding.logical_to_spec(("batch", "length", "heads", None), rules, mesh)
    spec2 = sharding.logical_to_spec(("batch", "length"), rules, mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2), out_specs=spec4,
                         check_vma=False)(q_BTNK, k_BSNK, v_BSNV, start_BT)


# ---- grouped matmul -----------------------------------------------------------------------------

def _rows_in_groups(y_MN, sizes_G):
    """Rows past sum(sizes) set to zero (the expert-parallel receive buffer relies on it; kernels leave them
    undefined)."""
    live_M = jnp.arange(y_MN.shape[0], dtype=jnp.int32) < jnp.sum(sizes_G)
    return jnp.where(live_M[:, None], y_MN, jnp.zeros((), y_MN.dtype))


# tokamax's Mosaic GPU ragged dot on Hopper (sm90): the tile its heuristic picks (block_m 64, block_n 64, 2 stages)
# against this one, on the bench preset's expert shapes (98,304 rows, 64 experts; bench/ragged_dot_tune.py, H100,
# docs/LOG.md session 16): gate/up [1024 -> 1024] 737 -> 545 us, down [512 -> 1024] 378 -> 344 us, the down input
# gradient [1024 -> 512] 365 -> 289 us. tokamax's shipped autotuning cache has none of these shapes.
# The tile pads each group's rows to a multiple of block_m: it is taken from LARGE_GROUP_ROWS rows per group on
# average (training and prefill: 1,536 at the bench preset's B 8 x T 2048), not for decode steps (a GRPO rollout's
# 512 rows give 48 per expert, where it slowed the sampler by a quarter).
SM90_RAGGED_DOT = dict(block_m=128, block_n=64, block_k=128, num_stages=4, split_k=1, persistent=False)
LARGE_GROUP_ROWS = 256


def _ragged_dot_impl(M: int, K: int, N: int, G: int):
    """tokamax's ragged-dot implementation for a [M, K] x [G, K, N] product on this platform: on Hopper GPUs, for
    groups of LARGE_GROUP_ROWS rows or more on average, the Mosaic GPU kernel with SM90_RAGGED_DOT's tile where the
    widths divide it; otherwise `_impl`'s choice with tokamax's own config."""
    impl = _impl("ragged_dot")
    if impl != "mosaic_gpu" or K % SM90_RAGGED_DOT["block_k"] or N % SM90_RAGGED_DOT["block_n"]:
        return impl
    if M < LARGE_GROUP_ROWS * G:
        return impl
    if getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        return impl
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as mg  # lazy on purpose: see _tokamax
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as common  # lazy on purpose: see _tokamax
    config = mg.Config(**SM90_RAGGED_DOT, grid_minor_dim=common.MatmulDimension.M, grid_tile_width=1)
    return (mg.PallasMosaicGpuRaggedDot(config=config),)


def _tokamax_ragged_dot(x_MK, w_GKN, sizes_G, all_rows: bool = False):
    impl = _ragged_dot_impl(x_MK.shape[0], x_MK.shape[1], w_GKN.shape[2], w_GKN.shape[0])
    y_MN = _tokamax().ragged_dot(x_MK, w_GKN, sizes_G, implementation=impl)
    return y_MN if all_rows else _rows_in_groups(y_MN, sizes_G)


# Where the grouped matmuls' forward (GMM_FORWARD) and input gradient (GMM_INPUT_GRAD) come from, for
# LARGE_GROUP_ROWS rows per group or more (training, prefill):
#   "tokamax"  its Mosaic GPU ragged dot (the input gradient against the weights transposed, a [G, N, K] copy of them
#              each step; a pair of weights concatenated each step, `grouped_matmul`);
#   "triton"   gmm_grad's Triton row kernels (`grouped_matmul`, `grouped_dx`: the weights read as stored, a pair
#              without concatenation, `_grouped_matmul_pair_gpu`);
#   "pairs"    the row kernels for a pair of weights (the experts' gate / up), tokamax for single weights (down).
# On an H100 (docs/LOG.md session 22, bench preset, B 8 x T 2048, remat none) the step ran 95.2 ms with tokamax and
# 91.7 ms with "triton" for both (+3.7%, +0.75 GiB peak). Per product (bench/ragged_dot_tune.py --rows-kernels), the
# row kernels win on the gate / up pair (forward 581-641 us against tokamax's 628 with the concatenation, input
# gradient 598 against 638) and lose on down (496 against 347, input gradient 462 against 337); yet in the step
# "pairs" ran 93.1 ms against "triton"'s 91.6 ms (session 23, H100, `bench/train_bench.py --ops GMM_FORWARD=pairs
# GMM_INPUT_GRAD=pairs`), so "triton" stays the default.
GMM_CHOICES = ("tokamax", "triton", "pairs")
GMM_FORWARD = "triton"


def _gmm_choice(name: str, pair: bool) -> bool:
    """Whether the setting `name` ("GMM_FORWARD" or "GMM_INPUT_GRAD") takes the row kernels for a pair (pair) or a
    single weight."""
    value = globals()[name]
    if value not in GMM_CHOICES:
        raise ValueError(f"deepjax.model.ops.{name}={value!r}: one of {', '.join(GMM_CHOICES)}")
    return value == "triton" or (pair and value == "pairs")


def _gmm_forward(x_MK, w_GKN, sizes_G, all_rows):
    M, K, N, G = x_MK.shape[0], x_MK.shape[1], w_GKN.shape[2], w_GKN.shape[0]
    if _gmm_choice("GMM_FORWARD", False) and M >= LARGE_GROUP_ROWS * G and gmm_grad.rows_supported(K, N):
        y_MN = gmm_grad.grouped_matmul(x_MK, w_GKN, sizes_G)
        return y_MN if all_rows else _rows_in_groups(y_MN, sizes_G)
    return _tokamax_ragged_dot(x_MK, w_GKN, sizes_G, all_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul_gpu(x_MK, w_GKN, sizes_G, all_rows):
    """tokamax's Mosaic GPU kernels for the output and the input gradient (or gmm_grad's Triton row kernels:
    GMM_FORWARD, GMM_INPUT_GRAD); the weight gradient from `gmm_grad.grouped_dw` (tokamax's own bf16 weight
    gradient is wrong on the H200: see that module)."""
    return _gmm_forward(x_MK, w_GKN, sizes_G, all_rows)


def _gmm_fwd(x_MK, w_GKN, sizes_G, all_rows):
    return _gmm_forward(x_MK, w_GKN, sizes_G, all_rows), (x_MK, w_GKN, sizes_G)


GMM_INPUT_GRAD = "triton"  # see GMM_FORWARD


def _gmm_bwd(all_rows, res, dy_MN):
    x_MK, w_GKN, sizes_G = res
    dy_MN = dy_MN.astype(x_MK.dtype)
    M, G = x_MK.shape[0], w_GKN.shape[0]
    if (_gmm_choice("GMM_INPUT_GRAD", False) and M >= LARGE_GROUP_ROWS * G
            and gmm_grad.rows_supported(w_GKN.shape[1], w_GKN.shape[2])):
        dx_MK = gmm_grad.grouped_dx(dy_MN, w_GKN, sizes_G)
        dx_MK = dx_MK if all_rows else _rows_in_groups(dx_MK, sizes_G)
    else:
        dx_MK = _tokamax_ragged_dot(dy_MN, jnp.swapaxes(w_GKN, 1, 2), sizes_G, all_rows)
    dw_GKN = gmm_grad.grouped_dw(x_MK, dy_MN, sizes_G, out_dtype=w_GKN.dtype)
    return dx_MK, dw_GKN, None


_grouped_matmul_gpu.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x_MK, w_GKN, sizes_G, kernels: str = "auto", all_rows: bool = False):
    """`lax.ragged_dot` semantics: x's rows sorted by group, group g's rows times w[g] ([M, N]); rows past
    sum(sizes) come out zero on every path. On tokamax: its kernels (with this module's weight gradient on GPU);
    on XLA: `lax.ragged_dot`. all_rows: the caller's groups cover every row (sum(sizes) == M, as the dropless
    experts on one device), so the kernels' outputs need no zeroing of rows past the groups (a pass over [M, N]
    each, forward and backward, otherwise). w_GKN may be a pair (w_a, w_b) of [G, K, N_a], [G, K, N_b] weights:
    the product with their concatenation, [M, N_a + N_b], which GMM_FORWARD "triton" or "pairs" computes without
    forming it (`_grouped_matmul_pair_gpu`); the other paths concatenate them."""
    tokamax = resolve(kernels, x_MK.dtype) == "tokamax"
    gpu = tokamax and platform() in ("gpu", "cuda")
    for name in ("GMM_FORWARD", "GMM_INPUT_GRAD"):  # a bad setting fails on every platform, not only on GPUs
        _gmm_choice(name, False)
    if isinstance(w_GKN, tuple):
        if gpu and _pair_on_triton(x_MK, *w_GKN):
            return _grouped_matmul_pair_gpu(x_MK, *w_GKN, sizes_G, all_rows)
        w_GKN = jnp.concatenate(w_GKN, axis=-1)
    if gpu and gmm_grad.supported(x_MK.shape[1], w_GKN.shape[2]):
        return _grouped_matmul_gpu(x_MK, w_GKN, sizes_G, all_rows)
    if tokamax:
        return _tokamax_ragged_dot(x_MK, w_GKN, sizes_G, all_rows)
    return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)


def _pair_on_triton(x_MK, wa_GKN, wb_GKN) -> bool:
    """Whether a pair's product takes `_grouped_matmul_pair_gpu`: GMM_FORWARD "triton" or "pairs", groups of
    LARGE_GROUP_ROWS rows or more on average, widths the Triton tiles take (the pair's weight gradients come from
    `grouped_dw`)."""
    K, G = x_MK.shape[1], wa_GKN.shape[0]
    return (_gmm_choice("GMM_FORWARD", True) and x_MK.shape[0] >= LARGE_GROUP_ROWS * G
            and all(gmm_grad.rows_supported(K, w.shape[2]) and gmm_grad.supported(K, w.shape[2])
                    for w in (wa_GKN, wb_GKN)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_matmul_pair_gpu(x_MK, wa_GKN, wb_GKN, sizes_G, all_rows):
    """x against the concatenation of wa and wb without forming it: gmm_grad's Triton row kernel writes each
    weight's columns of one output; the input gradient reads both weights (`grouped_dx` with w2, or tokamax's
    kernel against the transposed concatenation: GMM_INPUT_GRAD) and each weight's gradient is `grouped_dw` over
    its own columns of dy. No [G, K, N_a + N_b] concatenation in the forward, nor its gradient's split."""
    return _pair_fwd(x_MK, wa_GKN, wb_GKN, sizes_G, all_rows)[0]


def _pair_fwd(x_MK, wa_GKN, wb_GKN, sizes_G, all_rows):
    y_MN = gmm_grad.grouped_matmul(x_MK, wa_GKN, sizes_G, w2_GKN=wb_GKN)
    y_MN = y_MN if all_rows else _rows_in_groups(y_MN, sizes_G)
    return y_MN, (x_MK, wa_GKN, wb_GKN, sizes_G)


def _pair_bwd(all_rows, res, dy_MN):
    x_MK, wa_GKN, wb_GKN, sizes_G = res
    dy_MN = dy_MN.astype(x_MK.dtype)
    Na = wa_GKN.shape[2]
    if _gmm_choice("GMM_INPUT_GRAD", True):
        dx_MK = gmm_grad.grouped_dx(dy_MN, wa_GKN, sizes_G, w2_GKN=wb_GKN)
        dx_MK = dx_MK if all_rows else _rows_in_groups(dx_MK, sizes_G)
    else:
        w_GNK = jnp.swapaxes(jnp.concatenate([wa_GKN, wb_GKN], axis=-1), 1, 2)
        dx_MK = _tokamax_ragged_dot(dy_MN, w_GNK, sizes_G, all_rows)
    dwa = gmm_grad.grouped_dw(x_MK, dy_MN, sizes_G, out_dtype=wa_GKN.dtype, cols=(0, Na))
    dwb = gmm_grad.grouped_dw(x_MK, dy_MN, sizes_G, out_dtype=wb_GKN.dtype, cols=(Na, wb_GKN.shape[2]))
    return dx_MK, dwa, dwb, None


_grouped_matmul_pair_gpu.defvjp(_pair_fwd, _pair_bwd)


# The experts' rows read from the tokens and stored back in token order inside gmm_grad's Triton row kernels
# (`gmm_grad.grouped_matmul_rows`, `gmm_grad.grouped_matmul_unsorted`): no sorted [M, K] copy of the tokens nor its
# residual (a gather kernel of ~29 ms of an H100 update in 8 micro-batches, docs/LOG.md session 29), and no unsort
# gather forward or backward (~35 ms there). Untimed: bench/grpo_bench.py --ops GATHER_ROWS=True SCATTER_ROWS=True.
GATHER_ROWS = False  # the gate / up product reads each sorted row from the tokens (False: the sorted copy)
SCATTER_ROWS = False  # the down product stores its rows in token order (False: the unsort gather)


def gathers_rows(x_TK, n_rows: int, wa_GKN, wb_GKN, kernels: str = "auto") -> bool:
    """Whether the experts' gate / up product of n_rows sorted rows takes `gmm_grad.grouped_matmul_rows` (GATHER_ROWS,
    on the GPU's tokamax path where the pair's product runs on gmm_grad's Triton row kernels): else the caller
    copies the sorted rows."""
    return (GATHER_ROWS and resolve(kernels, x_TK.dtype) == "tokamax" and platform() in ("gpu", "cuda")
            and _pair_on_triton(jax.ShapeDtypeStruct((n_rows, x_TK.shape[1]), x_TK.dtype), wa_GKN, wb_GKN)
            and _gmm_choice("GMM_INPUT_GRAD", True))


def scatters_rows(x_TK, n_rows: int, w_GIN, kernels: str = "auto") -> bool:
    """Whether the experts' down product of n_rows sorted rows (in x's dtype) takes
    `gmm_grad.grouped_matmul_unsorted` (SCATTER_ROWS, on the GPU's tokamax path with gmm_grad's Triton row kernels
    for the forward and the input gradient): else the caller unsorts the rows itself."""
    K, N = w_GIN.shape[1], w_GIN.shape[2]
    return (SCATTER_ROWS and resolve(kernels, x_TK.dtype) == "tokamax" and platform() in ("gpu", "cuda")
            and _gmm_choice("GMM_FORWARD", False) and _gmm_choice("GMM_INPUT_GRAD", False)
            and n_rows >= LARGE_GROUP_ROWS * w_GIN.shape[0] and gmm_grad.rows_supported(K, N)
            and gmm_grad.supported(K, N))


# ---- LM head + cross-entropy --------------------------------------------------------------------

def _chunks(B: int, T: int):
    """(c, n): positions per chunk and chunk count for the chunked LM-head ops, CE_CHUNK_TOKENS rows x positions a
    chunk per device. Under a mesh B is the global batch, split over the batch shards (counting it as one device's
    made DeepSeek-V3 on 512 chips take 8-token chunks: 512 steps, each all-reducing a [D, V] float32 partial
    weight gradient; docs/LOG.md session 16)."""
    c = max(1, min(T, CE_CHUNK_TOKENS // _local_rows(B)))
    return c, -(-T // c)


def _local_rows(B: int) -> int:
    """Rows of a global batch of B on one device (B outside a mesh)."""
    ctx = sharding.current()
    return max(1, B // sharding.batch_shards(*ctx)) if ctx is not None else B


def _split_chunks(c: int, n: int, *arrays):
    """Each [B, T, ...] array padded to n * c positions and split into [n, B, c, ...] chunks."""
    out = []
    for a in arrays:
        B, T = a.shape[:2]
        a = jnp.pad(a, ((0, 0), (0, n * c - T)) + ((0, 0),) * (a.ndim - 2))
        out.append(jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0))
    return out


def _unchunk(a_nBC, T: int):
    """[n, B, c, ...] chunk outputs as [B, T, ...] (padding dropped)."""
    n, B, c = a_nBC.shape[:3]
    return jnp.moveaxis(a_nBC, 0, 1).reshape(B, n * c, *a_nBC.shape[3:])[:, :T]


def _ce_chunks(h_BTD, w_DV, targets_BT, weights_BT, with_grad: bool):
    """(loss, dh, dw): sum over positions of weights x CE(h @ w, target), by chunks of positions along T."""
    B, T, D = h_BTD.shape
    V = w_DV.shape[1]
    c, n = _chunks(B, T)
    v_V = jnp.arange(V, dtype=jnp.int32)

    def body(dw_DV, xs):
        h_BCD, t_BC, wt_BC = xs
        logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
        logits_BCV = sharding.constrain(logits_BCV, ("batch", "length", "vocab"))
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        hit_BCV = v_V[None, None] == t_BC[..., None]
        tgt_BC = jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)
        loss = jnp.sum((lse_BC - tgt_BC) * wt_BC)
        if not with_grad:
            return dw_DV, (loss, None)
        p_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
        g_BCV = ((p_BCV - hit_BCV) * wt_BC[..., None]).astype(h_BCD.dtype)
        dh_BCD = jnp.einsum("bcv,dv->bcd", g_BCV, w_DV)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, g_BCV, preferred_element_type=jnp.float32)
        return sharding.constrain(dw_DV, ("embed", "vocab")), (loss, dh_BCD)

    dw0 = jnp.zeros((D, V), jnp.float32) if with_grad else jnp.zeros((), jnp.float32)
    dw_DV, (loss_n, dh_nBCD) = jax.lax.scan(
        body, dw0, tuple(_split_chunks(c, n, h_BTD, targets_BT, weights_BT.astype(jnp.float32))))
    if not with_grad:
        return loss_n.sum(), None, None
    return loss_n.sum(), _unchunk(dh_nBCD, T), dw_DV


@jax.custom_vjp
def lm_head_ce(h_BTD, w_DV, targets_BT, weights_BT):
    """sum_{b,t} weights[b,t] * CE(softmax(h[b,t] @ w), targets[b,t]) in float32 (logits accumulate in float32),
    computed over chunks of positions: the [B, T, V] logits are never held, and under differentiation each chunk's
    gradient is computed in the forward, so the backward does not recompute the head. weights carry the mask and
    the mean's denominator; targets and weights get no gradient."""
    return _ce_chunks(h_BTD, w_DV, targets_BT, weights_BT, with_grad=False)[0]


def _ce_fwd(h_BTD, w_DV, targets_BT, weights_BT):
    loss, dh_BTD, dw_DV = _ce_chunks(h_BTD, w_DV, targets_BT, weights_BT, with_grad=True)
    return loss, (dh_BTD, dw_DV, jnp.zeros((), w_DV.dtype))


def _ce_bwd(res, g):
    dh_BTD, dw_DV, w_like = res
    return ((g * dh_BTD.astype(jnp.float32)).astype(dh_BTD.dtype), (g * dw_DV).astype(w_like.dtype), None, None)


lm_head_ce.defvjp(_ce_fwd, _ce_bwd)


def _raw_logits(h_BCD, w_DV):
    """The head's product in h's dtype, as `Transformer.logits` rounds it."""
    return jnp.einsum("bcd,dv->bcv", h_BCD, w_DV)


def _scaled_logits(raw_BCV, tau: float):
    """The product (`_raw_logits`) in float32, divided by the temperature."""
    return sharding.constrain(raw_BCV.astype(jnp.float32), ("batch", "length", "vocab")) / tau


# lm_head_logprobs' backward reuses the forward's logits when they are 16-bit and take at most this many bytes on a
# device, and at most 1/KEEP_LOGITS_MEMORY_SHARE of its memory where the device reports it ([B, T, V] bf16: 4.6 GB
# for a GRPO micro-batch of 128 rows x 560 positions at V = 32,000), instead of recomputing them: the head's product
# once less per update (~19 TFLOP at the bench preset's GRPO iteration), the same values (the product rounded to
# bf16 either way). Above it (DeepSeek-V3's 129k vocabulary on long rows) the backward recomputes them by chunks.
KEEP_LOGITS_MAX_BYTES = 8 << 30
KEEP_LOGITS_MEMORY_SHARE = 16


def _keep_limit() -> int:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (a backend without memory statistics)
        stats = {}
    limit = stats.get("bytes_limit")
    return min(KEEP_LOGITS_MAX_BYTES, limit // KEEP_LOGITS_MEMORY_SHARE) if limit else KEEP_LOGITS_MAX_BYTES


def _keeps_logits(h_BTD, w_DV) -> bool:
    dt = jnp.result_type(h_BTD.dtype, w_DV.dtype)
    B, T = h_BTD.shape[:2]
    c, n = _chunks(B, T)
    return dt.itemsize <= 2 and _local_rows(B) * n * c * w_DV.shape[1] * dt.itemsize <= _keep_limit()


def _logp_chunks(h_BTD, w_DV, targets_BT, tau: float, keep_logits: bool = False):
    """(logp, entropy, lse) [B, T] by chunks of positions (`lm_head_logprobs`), and with keep_logits each chunk's
    unscaled logits [n, B, c, V] in the product's dtype."""
    B, T, _ = h_BTD.shape
    c, n = _chunks(B, T)
    v_V = jnp.arange(w_DV.shape[1], dtype=jnp.int32)

    def body(_, xs):
        h_BCD, t_BC = xs
        raw_BCV = _raw_logits(h_BCD, w_DV)
        s_BCV = _scaled_logits(raw_BCV, tau)
        lse_BC = jax.nn.logsumexp(s_BCV, axis=-1)
        tgt_BC = jnp.sum(jnp.where(v_V[None, None] == t_BC[..., None], s_BCV, 0.0), axis=-1)
        lp_BCV = s_BCV - lse_BC[..., None]
        out = (tgt_BC - lse_BC, -jnp.sum(jnp.exp(lp_BCV) * lp_BCV, axis=-1), lse_BC)
        return None, out + ((raw_BCV,) if keep_logits else ())

    _, outs = jax.lax.scan(body, None, tuple(_split_chunks(c, n, h_BTD, targets_BT)))
    return tuple(_unchunk(o, T) for o in outs[:3]) + tuple(outs[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lm_head_logprobs(h_BTD, w_DV, targets_BT, tau: float):
    """(logp, entropy) [B, T] float32: log softmax(h[b, t] @ w / tau)[targets[b, t]] and the entropy of that
    distribution, with the logits rounded as `Transformer.logits` rounds them, computed over chunks of positions:
    no [B, T, V] float32 array is held, forward or backward. The backward takes the forward's 16-bit logits when
    they fit KEEP_LOGITS_MAX_BYTES, else recomputes each chunk's (one more head matmul, for [B, T, V] float32
    tensors that at GRPO's 64 rows x 560 positions are 4.6 GB each). The entropy carries no gradient (a metric);
    targets get none. The policy log-probs of `deepjax.rl.update`."""
    return _logp_chunks(h_BTD, w_DV, targets_BT, tau)[:2]


def _logp_fwd(h_BTD, w_DV, targets_BT, tau):
    keep = _keeps_logits(h_BTD, w_DV)
    logp, ent, lse, *raw = _logp_chunks(h_BTD, w_DV, targets_BT, tau, keep)
    return (logp, ent), (h_BTD, w_DV, targets_BT, lse, raw[0] if keep else None)


def _logp_bwd(tau, res, g):
    h_BTD, w_DV, targets_BT, lse_BT, raw_nBCV = res
    g_BT = g[0].astype(jnp.float32)  # (the entropy's cotangent is dropped: no gradient)
    B, T, D = h_BTD.shape
    c, n = _chunks(B, T)
    v_V = jnp.arange(w_DV.shape[1], dtype=jnp.int32)

    def body(dw_DV, xs):
        h_BCD, t_BC, lse_BC, g_BC, *raw = xs
        raw_BCV = raw[0] if raw else _raw_logits(h_BCD, w_DV)  # the forward's, or recomputed
        p_BCV = jnp.exp(_scaled_logits(raw_BCV, tau) - lse_BC[..., None])
        d_BCV = ((v_V[None, None] == t_BC[..., None]) - p_BCV) * (g_BC / tau)[..., None]
        d_BCV = d_BCV.astype(h_BCD.dtype)  # (the transpose of the logits' cast to float32)
        dh_BCD = jnp.einsum("bcv,dv->bcd", d_BCV, w_DV).astype(h_BCD.dtype)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, d_BCV, preferred_element_type=jnp.float32)
        return sharding.constrain(dw_DV, ("embed", "vocab")), dh_BCD

    xs = tuple(_split_chunks(c, n, h_BTD, targets_BT, lse_BT, g_BT)) + (() if raw_nBCV is None else (raw_nBCV,))
    dw_DV, dh_nBCD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
    return _unchunk(dh_nBCD, T), dw_DV.astype(w_DV.dtype), None


lm_head_logprobs.defvjp(_logp_fwd, _logp_bwd)
