"""`deepjax eval`: sample k answers per held-out problem from a trained run and report R1's metrics.

    deepjax eval runs/tiny --k 8 --problems 200           # the newest checkpoint of a `deepjax train` run directory

For each held-out problem of the run's task (`tasks.generate(..., split="test")`, disjoint from training), the
prompt is the run's template; k samples are drawn with `sampling.generate` on the run's mesh (defaults as R1's
evaluation: temperature 0.6, top-p 0.95). Reported (deepjax/rl/metrics.py): pass@1 estimated from the k samples,
pass@k with the unbiased estimator, cons@k by majority vote over extracted answers, for k = 1, 2, 4, ... (the
test-time-scaling table). Written to the run directory: `eval_step<N>.json` (table + every problem's answers),
`eval_step<N>_scaling.png`. Single process (the batch is put on the mesh from this host).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepjax.parallel import distributed as D
from deepjax.rl import metrics as evaluation
from deepjax.infer import sampling as SP
from deepjax.parallel import sharding as S
from deepjax.data import tasks
from deepjax.config import Config, from_dict
from deepjax.schema import ConfigError

EVAL_TASKS = tasks.TASKS  # sources with a generated held-out split


def load_run(workdir: str, step: Optional[int] = None, mesh=None, rules=None):
    """(config, step, graphdef, params (router biases included), mesh, rules) of a `deepjax train` or `grpo` run,
    placed on the run's own mesh, or on `mesh` / `rules` when given."""
    from deepjax.train import loop as T
    from deepjax.train.checkpoint import Checkpointer

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a deepjax run directory (no config.json)")
    with open(path) as f:
        cfg = from_dict(json.load(f))
    if mesh is None:
        mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    graphdef, *_, abstract = T.abstract_train_state(cfg, mesh, rules)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step, state, _, _ = ck.restore(abstract, step=step)
    finally:
        ck.close()
    return cfg, step, graphdef, nnx.merge_state(state.params, state.router_bias), mesh, rules


def held_out(cfg: Config, n: int) -> list[dict]:
    if cfg.data.source not in EVAL_TASKS:
        raise ConfigError(f"data.source={cfg.data.source!r}: eval needs a generated task with a held-out split "
                          f"({', '.join(EVAL_TASKS)})")
    return tasks.generate(cfg.data.source, n, cfg.data.task_seed, "test", **tasks.options_of(cfg.data))


def sample_completions(cfg: Config, graphdef, params, mesh, rules, examples: list[dict], k: int,
                       sc: SP.SamplingConfig, seed: int = 0, batch: int = 64, progress: bool = True) -> list[list[str]]:
    """k completions (decoded text, up to and excluding EOS) per example, sampled in batches of rows."""
    from tqdm import tqdm

    from deepjax.data.tokenizer import TEMPLATES, load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    sc = SP.SamplingConfig(**{**sc.__dict__, "eos_ids": (tok.eos_id,), "pad_id": tok.pad_id})
    prompts = [tok.encode(TEMPLATES[cfg.data.template](ex["question"]), add_bos=True) for ex in examples]
    rows = [p for p in prompts for _ in range(k)]  # problem i -> rows i*k ... i*k + k-1
    shards = S.batch_shards(mesh, rules)
    batch = max(shards, batch // shards * shards)  # rows split evenly over the batch axes
    P_max = max(len(p) for p in prompts)
    texts: list[str] = []
    key = jax.random.key(seed)
    with S.use_mesh(mesh, rules):
        for start in tqdm(range(0, len(rows), batch), desc="eval", unit="batch", disable=not progress):
            chunk = rows[start:start + batch]
            n_real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch - n_real)  # a fixed batch shape: one compilation
            P, L = SP.pad_prompts(chunk, pad_id=tok.pad_id, multiple=max(8, -(-P_max // 8) * 8))
            key, sub = jax.random.split(key)
            out = SP.jit_generate(graphdef, params, jax.device_put(jnp.asarray(P), S.batch_spec(mesh, rules)),
                                  jax.device_put(jnp.asarray(L), S.batch_spec(mesh, rules, ndim=1)), sub, sc)
            toks, lens, done = (D.host_array(x) for x in (out.tokens, out.lengths, out.done))
            for r in range(n_real):
                n = int(lens[r]) - int(done[r])  # drop the EOS itself
                texts.append(tok.decode(toks[r, :n], errors="replace"))
    return [texts[i * k:(i + 1) * k] for i in range(len(examples))]


def run(workdir: str, k: int = 8, problems: int = 100, temperature: float = 0.6, top_p: float = 0.95,
        max_new_tokens: int = 64, batch: int = 64, seed: int = 0, step: Optional[int] = None,
        progress: bool = True) -> dict:
    cfg, step, graphdef, params, mesh, rules = load_run(workdir, step)
    examples = held_out(cfg, problems)
    sc = SP.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    completions = sample_completions(cfg, graphdef, params, mesh, rules, examples, k, sc, seed, batch, progress)
    result = evaluation.summarize(examples, completions)
    result.update(workdir=os.path.abspath(workdir), step=step, k=k, n_problems=problems, temperature=temperature,
                  top_p=top_p, max_new_tokens=max_new_tokens, task=cfg.data.source)
    base = os.path.join(workdir, f"eval_step{step}")
    if jax.process_index() == 0:
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        evaluation.plot_scaling(result["table"], base + "_scaling.png",
                                title=f"{cfg.data.source}, step {step}: accuracy vs samples per problem")
    return result


def format_table(table: list[dict]) -> str:
    lines = [f"{'k':>4} {'pass@1':>8} {'pass@k':>8} {'cons@k':>8}"]
    for r in table:
        lines.append(f"{r['k']:>4} {100 * r['pass@1']:>7.1f}% {100 * r['pass@k']:>7.1f}% {100 * r['cons@k']:>7.1f}%")
    return "\n".join(lines)


__all__ = ["run", "load_run", "held_out", "sample_completions", "format_table"]
