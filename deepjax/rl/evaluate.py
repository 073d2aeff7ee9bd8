"""`deepjax eval`: sample k answers per held-out problem from a trained run and report R1's metrics.

    deepjax eval runs/tiny --k 8 --problems 200           # the newest checkpoint of a `deepjax train` run directory

For each held-out problem of the run's task (`tasks.generate(..., split="test")`, disjoint from training), the
prompt is the run's template; k samples are drawn with `sampling.generate` on the run's mesh (defaults as R1's
evaluation: temperature 0.6, top-p 0.95). Reported (deepjax/rl/metrics.py): pass@1 estimated from the k samples,
pass@k with the unbiased estimator, cons@k by majority vote over extracted answers, for k = 1, 2, 4, ... (the
test-time-scaling table). Written to the run directory (local or gs://): `eval_step<N>.json` (table + every
problem's answers), `eval_step<N>_scaling.png`. Every process samples the same rows (deepjax/infer/text.py).
"""

from __future__ import annotations

import json
from typing import Optional

import jax
from tqdm import tqdm

from deepjax import paths
from deepjax.config import Config
from deepjax.data import tasks
from deepjax.data.tokenizer import load_tokenizer
from deepjax.infer import sampling as SP
from deepjax.infer import text
from deepjax.parallel import sharding as S
from deepjax.rl import metrics
from deepjax.schema import ConfigError
from deepjax.train.run import load_params

EVAL_TASKS = tasks.TASKS  # sources with a generated held-out split


def held_out(cfg: Config, n: int) -> list[dict]:
    if cfg.data.source not in EVAL_TASKS:
        raise ConfigError(f"data.source={cfg.data.source!r}: eval needs a generated task with a held-out split "
                          f"({', '.join(EVAL_TASKS)})")
    return tasks.generate(cfg.data.source, n, cfg.data.task_seed, "test", **tasks.options_of(cfg.data))


def sample_completions(cfg: Config, graphdef, params, mesh, rules, examples: list[dict], k: int,
                       sc: SP.SamplingConfig, seed: int = 0, batch: int = 64, progress: bool = True) -> list[list[str]]:
    """k completions (decoded text, up to and excluding EOS) per example, sampled in batches of rows."""
    tok = load_tokenizer(cfg.data.tokenizer)
    prompts = text.prompt_ids(tok, cfg.data.template, [ex["question"] for ex in examples])
    rows = [p for p in prompts for _ in range(k)]  # problem i -> rows i*k ... i*k + k-1
    shards = S.batch_shards(mesh, rules)
    batch = max(shards, batch // shards * shards)  # rows split evenly over the batch axes
    pad_to = max(8, -(-max(len(p) for p in prompts) // 8) * 8)  # one prompt length for every batch
    texts: list[str] = []
    key = jax.random.key(seed)
    for start in tqdm(range(0, len(rows), batch), desc="eval", unit="batch", disable=not progress):
        chunk = rows[start:start + batch]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n_real)  # a fixed batch shape: one compilation
        key, sub = jax.random.split(key)
        texts += text.complete(graphdef, params, tok, chunk, sub, sc, mesh, rules, pad_multiple=pad_to).texts[:n_real]
    return [texts[i * k:(i + 1) * k] for i in range(len(examples))]


def run(workdir, k: int = 8, problems: int = 100, temperature: float = 0.6, top_p: float = 0.95,
        max_new_tokens: int = 64, batch: int = 64, seed: int = 0, step: Optional[int] = None,
        progress: bool = True) -> dict:
    workdir = paths.run_path(workdir, "run directory")  # local (absolute) or gs://
    cfg, step, graphdef, params, mesh, rules = load_params(workdir, step)
    examples = held_out(cfg, problems)
    sc = SP.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    completions = sample_completions(cfg, graphdef, params, mesh, rules, examples, k, sc, seed, batch, progress)
    result = metrics.summarize(examples, completions, reward_cfg=cfg.rl.reward)  # the rule GRPO rewarded
    result.update(workdir=str(workdir), step=step, k=k, n_problems=problems, temperature=temperature,
                  top_p=top_p, max_new_tokens=max_new_tokens, task=cfg.data.source)
    if jax.process_index() == 0:
        paths.write_text_atomic(workdir / f"eval_step{step}.json", json.dumps(result, indent=1))
        with paths.local_file(workdir / f"eval_step{step}_scaling.png") as png:  # plot_scaling takes a local name
            metrics.plot_scaling(result["table"], png,
                                 title=f"{cfg.data.source}, step {step}: accuracy vs samples per problem")
    return result


def format_table(table: list[dict]) -> str:
    lines = [f"{'k':>4} {'pass@1':>8} {'pass@k':>8} {'cons@k':>8}"]
    for r in table:
        lines.append(f"{r['k']:>4} {100 * r['pass@1']:>7.1f}% {100 * r['pass@k']:>7.1f}% {100 * r['cons@k']:>7.1f}%")
    return "\n".join(lines)


__all__ = ["run", "held_out", "sample_completions", "format_table"]
