"""MTP drafting on a trained model: acceptance rate, equality with plain greedy decoding, and held-out accuracy.

    deepjax train tiny --workdir runs/tiny --config.data.template=plain --config.train.steps=300 --config.optim.lr=3e-3
    PYTHONPATH=. python bench/mtp_acceptance.py runs/tiny --problems 64 --new 48

Restores the newest checkpoint of a `deepjax train` run directory, prompts it with held-out problems of its task
(`tasks.generate(..., split="test")`, in the run's prompt template), decodes greedily with and without MTP drafting
and prints one JSON line: drafts proposed / accepted, tokens per decode step, whether both outputs are identical,
and the share of problems solved (`rewards.accuracy_reward`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax.infer import sampling as SP
from deepjax.parallel import sharding as S
from deepjax.data import tasks
from deepjax.rl import rewards
from deepjax.train import run as TR
from deepjax.train.checkpoint import Checkpointer
from deepjax.config import from_dict
from deepjax.data.tokenizer import TEMPLATES, load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    a = ap.parse_args(argv)
    with open(os.path.join(a.workdir, "config.json")) as f:
        cfg = from_dict(json.load(f))
    mesh = S.make_mesh(cfg.mesh)
    rules = S.rules_for(cfg.mesh.rules)
    graphdef, *_, abstract = TR.abstract_train_state(cfg, mesh, rules)
    ck = Checkpointer(os.path.join(a.workdir, "checkpoints"))
    step, state, _, _ = ck.restore(abstract)
    ck.close()
    params = jax.device_get(nnx.merge_state(state.params, state.router_bias))
    tok = load_tokenizer(cfg.data.tokenizer)
    examples = tasks.generate(cfg.data.source, a.problems, cfg.data.task_seed, "test",
                              **tasks.options_of(cfg.data))
    prompts = [tok.encode(TEMPLATES[cfg.data.template](ex["question"]), add_bos=True) for ex in examples]
    P, L = SP.pad_prompts(prompts)
    sc = SP.SamplingConfig(max_new_tokens=a.new, temperature=0.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    outs, secs = {}, {}
    for draft in (False, True):
        run = lambda: SP.jit_generate(graphdef, params, jnp.asarray(P), jnp.asarray(L), jax.random.key(0),  # noqa
                                      SP.SamplingConfig(**{**sc.__dict__, "mtp_draft": draft}))
        jax.block_until_ready(run())
        t = time.perf_counter()
        outs[draft] = jax.block_until_ready(run())
        secs[draft] = time.perf_counter() - t
    plain, drafted = outs[False], outs[True]
    solved = 0
    for i, ex in enumerate(examples):
        n = int(plain.lengths[i])
        solved += rewards.accuracy_reward(ex, tok.decode(np.asarray(plain.tokens[i, :n]), errors="replace"))
    prop, acc = int(drafted.drafts_proposed.sum()), int(drafted.drafts_accepted.sum())
    print(json.dumps({
        "run": a.workdir, "step": step, "problems": a.problems, "device": jax.devices()[0].device_kind,
        "identical_to_greedy": bool((np.asarray(plain.tokens) == np.asarray(drafted.tokens)).all()),
        "drafts_proposed": prop, "drafts_accepted": acc, "acceptance": acc / max(prop, 1),
        "new_tokens": int(plain.lengths.sum()), "plain_s": secs[False], "drafted_s": secs[True],
        "solved": solved / a.problems,
    }))


if __name__ == "__main__":
    main()
