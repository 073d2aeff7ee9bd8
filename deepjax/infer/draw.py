"""Drawing the next token from logits (`sampling.generate` calls `sample` every step): greedy, temperature,
top-k / top-p truncation, the truncated set for sampling-mask replay, and the untruncated draw by the softmax's CDF.
`sampling` re-exports these names."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncate_logits(logits_BV, top_k: int, top_p: float):
    """Logits with everything outside the top-k / top-p set at -inf (the most likely token always stays)."""
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        order = jnp.argsort(-logits_BV, axis=-1)
        sorted_BV = jnp.take_along_axis(logits_BV, order, axis=-1)
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_BV.shape[0])[:, None], order].set(keep_sorted)
        logits_BV = jnp.where(keep, logits_BV, neg)
    return logits_BV


def kept_set(scaled_BV, top_k: int, top_p: float):
    """The ids [B, top_k] of the truncated set `truncate_logits` keeps (its top_k most likely, most likely first;
    -1 past the top-p cut), for top_k > 0 (ties at the k-th value aside)."""
    vals, ids = jax.lax.top_k(scaled_BV, top_k)
    probs = jax.nn.softmax(vals, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top-p cut over the top-k (renormalized) distribution
    return jnp.where(keep, ids, -1).astype(jnp.int32)


def kept_logprobs(scaled_BV, ids_BK, tok_B):
    """log-prob of tok under softmax over the kept ids only (-1: not kept): the truncated distribution."""
    vals = jnp.take_along_axis(scaled_BV, jnp.maximum(ids_BK, 0), axis=-1)
    lse = jax.nn.logsumexp(jnp.where(ids_BK >= 0, vals, -jnp.inf), axis=-1)
    return jnp.take_along_axis(scaled_BV, tok_B[:, None], axis=-1)[:, 0] - lse


CDF_BLOCK = 128  # `categorical_by_cdf`: vocabulary entries per block of the two-level search


def categorical_by_cdf(scaled_BV, key):
    """(tokens [B] int32, their log-probs [B]) drawn from softmax(scaled_BV) by inverting its CDF with one uniform
    per row: the unnormalized probabilities exp(s - max) summed in blocks of CDF_BLOCK entries, the block whose
    running sum first passes u * total, then the entry inside it the same way. The same distribution as
    `jax.random.categorical` (Gumbel-max) up to float32 sums, without its V random numbers a row: at GRPO's 512
    rows x 32,000 entries the Gumbel draw's threefry bits were most of the step's sampling time (one 88 us fusion
    a step on an H100, docs/LOG.md session 25). Zero-probability entries are never drawn (the searches stop at the
    last block and entry with mass); tests/test_sampling.py checks the frequencies."""
    return cdf_draw(scaled_BV, jax.random.uniform(key, (scaled_BV.shape[0],), jnp.float32))


def cdf_draw(scaled_BV, u_B):
    """`categorical_by_cdf` for given uniforms u [B] in [0, 1): the entry whose CDF interval holds u."""
    B, V = scaled_BV.shape
    W = CDF_BLOCK
    nb = -(-V // W)
    m_B = jnp.max(scaled_BV, axis=-1)
    p_BV = jnp.exp(scaled_BV - m_B[:, None])
    sums_BN = jnp.pad(p_BV, ((0, 0), (0, nb * W - V))).reshape(B, nb, W).sum(-1)
    cum_BN = jnp.cumsum(sums_BN, axis=-1)
    total_B = cum_BN[:, -1]
    u_B = u_B * total_B

    def first_past(cum, mass, u):  # the first index whose running sum passes u, at most the last one with mass
        last = cum.shape[-1] - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)
        return jnp.minimum(jnp.sum(cum <= u[:, None], axis=-1), last)

    blk_B = first_past(cum_BN, sums_BN, u_B)
    at = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=-1)[:, 0]  # noqa: E731
    # u past the blocks before; the difference rounds, and a negative r would stop the search at the block's first
    # entry even without mass (found by review: ~1e-6 of draws with a masked first entry)
    r_B = jnp.maximum(u_B - (at(cum_BN, blk_B) - at(sums_BN, blk_B)), 0.0)
    # the chosen block's probabilities recomputed from the logits (no [B, V] array of them is kept)
    idx_BW = blk_B[:, None] * W + jnp.arange(W)[None, :]
    p_BW = jnp.where(idx_BW < V, jnp.exp(jnp.take_along_axis(scaled_BV, jnp.minimum(idx_BW, V - 1), axis=-1)
                                         - m_B[:, None]), 0.0)
    tok = (blk_B * W + first_past(jnp.cumsum(p_BW, axis=-1), p_BW, r_B)).astype(jnp.int32)
    return tok, at(scaled_BV, tok) - m_B - jnp.log(total_B)


def sample(logits_BV, key, sc):
    """(tokens [B], log-probs [B]) under sc (a `sampling.SamplingConfig`), and with sc.record_support the kept
    set's ids [B, top_k] (`kept_set`): see `sampling`'s module docstring for which distribution the log-probs are
    under. Without truncation (top_k 0, top_p 1) the draw is `categorical_by_cdf`'s."""
    logits_BV = logits_BV.astype(jnp.float32)
    if sc.temperature == 0:
        tok = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    elif not sc.top_k and sc.top_p >= 1.0 and not sc.record_support:
        return categorical_by_cdf(logits_BV / sc.temperature, key)
    else:
        scaled = logits_BV / sc.temperature
        logp_BV = jax.nn.log_softmax(scaled, axis=-1)
        tok = jax.random.categorical(key, truncate_logits(scaled, sc.top_k, sc.top_p), axis=-1).astype(jnp.int32)
        if sc.record_support:
            ids = kept_set(scaled, sc.top_k, sc.top_p)
            return tok, kept_logprobs(scaled, ids, tok), ids
    return tok, jnp.take_along_axis(logp_BV, tok[:, None], axis=-1)[:, 0]
