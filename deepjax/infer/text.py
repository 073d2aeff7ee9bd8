"""Text in, text out: prompt -> pad -> generate on the mesh -> decode, the one path `deepjax eval` and GRPO's
rollouts take (deepjax/rl/evaluate.py, deepjax/rl/loop.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np

from deepjax.data.tokenizer import TEMPLATES
from deepjax.infer import sampling as SP
from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S


class Completions(NamedTuple):
    prompts: np.ndarray  # [B, P] right-padded prompt ids
    prompt_lengths: np.ndarray  # [B]
    tokens: np.ndarray  # [B, N] sampled ids (pad after a row stopped)
    logprobs: np.ndarray  # [B, N] the sampler's log-probs (sampling.generate)
    lengths: np.ndarray  # [B] tokens generated, EOS included
    done: np.ndarray  # [B] the row stopped at an EOS
    texts: list[str]  # each row decoded up to, not including, its EOS
    # [B, S, L_moe, K] with sampling.record_routes (sampling.Output.routes); the sampler's jax array with
    # complete(routes_on_device=True) on one process
    routes: Optional[np.ndarray | jax.Array] = None
    support: Optional[np.ndarray] = None  # [B, N, top_k] with sampling.record_support (sampling.Output.support)


def prompt_ids(tokenizer, template: str, questions: Sequence[str]) -> list[list[int]]:
    """Each question in the prompt template `template` (a key of tokenizer.TEMPLATES), BOS first."""
    return [tokenizer.encode(TEMPLATES[template](q), add_bos=True) for q in questions]


_SAID: set = set()


def decode_path(sc: SP.SamplingConfig, mesh, n_rows: int) -> str:
    """The decoder `complete` takes (`sampling.resolve_decoder`, a value of sampling.DECODERS other than "auto"). A
    one-device mesh samples outside the mesh, so "auto" takes the fused decode there (up to
    sampling.FUSED_DECODE_MAX_TOKENS rows); on a mesh of several devices "auto" is the model's modules, sharded
    over it, and a fused decoder named explicitly is an error naming sampling.decoder."""
    return SP.resolve_decoder(sc, None, n_rows, one_device=mesh.devices.size == 1)


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(f"deepjax: {message}", file=sys.stderr, flush=True)


def sampler_inputs(tokenizer, prompts: Sequence[Sequence[int]], sc: SP.SamplingConfig, pad_multiple: int = 16):
    """(prompts [B, P], lengths [B], sc with the tokenizer's EOS and pad ids): what `complete` hands the sampler."""
    P, L = SP.pad_prompts(list(prompts), pad_id=tokenizer.pad_id, multiple=pad_multiple)
    return P, L, dataclasses.replace(sc, eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)


def complete(graphdef, params, tokenizer, prompts: Sequence[Sequence[int]], key, sc: SP.SamplingConfig, mesh, rules,
             pad_multiple: int = 16, routes_on_device: bool = False) -> Completions:
    """Samples one completion per prompt (a row each) with `sc`, the tokenizer's EOS and pad ids, on `mesh`: rows
    split over the batch axes (every process passes all rows and gets all back). The decode is `decode_path`'s;
    on a mesh of several devices it says once (stderr) that the fused decode needs one device.
    routes_on_device: on one process the recorded routes stay the sampler's jax array (for GRPO's update:
    `update.routes_on_device`), not copied to the host."""
    P, L, sc = sampler_inputs(tokenizer, prompts, sc, pad_multiple)
    one_device = mesh.devices.size == 1
    if decode_path(sc, mesh, len(P)) == "model" and sc.decoder == "auto" and not one_device:
        _say_once(f"sampling: the model's modules decode on this {mesh.devices.size}-device mesh (the fused decode "
                  "runs on one device)")
    with contextlib.nullcontext() if one_device else S.use_mesh(mesh, rules):
        out = SP.jit_generate(graphdef, params, D.from_host(P, mesh, rules), D.from_host(L, mesh, rules), key, sc)
    # (routes come as int16: `sampling.routes_out`)
    keep = routes_on_device and out.routes is not None and jax.process_count() == 1
    toks, lps, lens, done, routes, support = D.host_arrays(out.tokens, out.logprobs, out.lengths, out.done,
                                                           None if keep else out.routes, out.support)
    routes = out.routes if keep else routes
    texts = [tokenizer.decode(toks[i, :int(lens[i]) - int(done[i])], errors="replace") for i in range(len(toks))]
    return Completions(P, L, toks, lps, lens, done, texts, routes, support)


__all__ = ["Completions", "prompt_ids", "sampler_inputs", "complete", "decode_path"]
