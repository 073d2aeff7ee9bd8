"""The GRPO loop behind `deepjax grpo`: rollouts from the sampler, rule-based rewards, group advantages and mu policy
updates, all on the training mesh and the training parameters (no second copy of the weights, no second mesh).

    deepjax grpo tiny --workdir runs/grpo --config.rl.init_from=runs/base [--config.rl.steps=100 ...]

One GRPO step (docs/deepseek.md, GRPO):

1. rl.prompts_per_step prompts from data.source's train split (a seeded Grain order, saved with the checkpoint);
2. rl.loss.group_size completions per prompt from `sampling.generate` (rl.rollout: temperature, top-p / top-k), the
   sampler's log-probs kept as pi_theta_old;
3. rewards (deepjax/rl/rewards.py: accuracy + format [+ language], weights rl.reward.*), group advantages;
4. with rl.loss.beta > 0 the reference policy's log-probs (the reference is the initial policy, copied from the policy
   again every rl.ref_refresh_every steps when set; with beta = 0 no reference is held or run);
5. rl.loss.mu optimizer updates on the same rollouts (`update.make_grpo_step`). The MTP modules are frozen (they get no
   gradient from the GRPO loss; without the freeze AdamW's weight decay would still shrink them).

Every rl.eval.every steps (and at the last) pass@1 on held-out problems (rl.eval.k samples each, temperature
rl.eval.temperature, top-p rl.eval.top_p as R1's evaluation).

What a run directory holds (as `deepjax train`'s, so `deepjax eval DIR` works on it):

    config.json          the resolved config
    checkpoints/<step>/  policy TrainState (params, router biases, optimizer, counters), the reference policy when
                         beta > 0 (item "ref"), the prompt iterator's state, the config; <step> counts GRPO steps
    metrics.jsonl        one line per GRPO step: reward, accuracy, format, response_length, rechecked (the share of
                         rollouts that re-check their work, `tasks.rechecked`), solved_all / solved_none
                         (share of groups with every / no output correct: zero advantage), loss, kl, clip_frac,
                         entropy, sampler_trainer_logp_gap, grad_norm, lr, rollout_s, update_s; eval_* on eval steps
    eval.jsonl           the periodic evaluations (pass@1, pass@k, cons@k at k = rl.eval.k)
    tb/                  TensorBoard events
    grpo_curves.png      reward, accuracy, response length, KL, clip fraction, entropy and held-out pass@1 per step

Restarting with the same work directory resumes from the newest checkpoint: the same policy, optimizer, reference,
prompt order and sampling keys (each step's key is fold_in(key(seed), step)), so a run killed and resumed ends
bitwise equal to one that never stopped (tests/test_rl_loop.py kills one with SIGKILL).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from deepjax import model as M
from deepjax import paths
from deepjax.config import Config, to_dict
from deepjax.data import tasks
from deepjax.infer import text
from deepjax.rl import evaluate
from deepjax.rl import loss as G
from deepjax.rl import metrics
from deepjax.rl import rewards as R
from deepjax.rl import update
from deepjax.parallel import sharding as S
from deepjax.schema import ConfigError
from deepjax.train import step as TS
from deepjax.train.run import Run, check_same_model, check_streak, kill_if_asked, load_params, running, scalars, \
    truncate_jsonl

FROZEN = ("mtp",)  # top-level parameter groups GRPO never changes


def _frozen(path) -> bool:
    first = path[0]
    return str(getattr(first, "key", getattr(first, "name", first))) in FROZEN


def freeze(new_params, old_params):
    """new_params with the FROZEN groups' leaves taken from old_params."""
    return jax.tree_util.tree_map_with_path(lambda p, n, o: o if _frozen(p) else n, new_params, old_params)


def make_step(graphdef, cfg: Config, optimizer, schedule):
    """The policy update: update.make_grpo_step with the FROZEN groups kept as they were."""
    inner = update.make_grpo_step(graphdef, cfg.model, optimizer, cfg.rl.grpo(), cfg.rl.rollout.temperature,
                              bias_update_speed=cfg.rl.bias_update_speed, lr_schedule=schedule,
                              routing_replay=cfg.rl.routing_replay, micro_batches=cfg.rl.micro_batches)

    def step(state: TS.TrainState, batch: update.Rollouts):
        new, metrics = inner(state, batch)
        return new._replace(params=freeze(new.params, state.params)), metrics

    return step


def restore_policy(run_dir, step: Optional[int], cfg: Config, mesh, rules):
    """(step, params State with router biases) of the checkpoint of another run directory (local or gs://), placed
    on `mesh`; its model must be `cfg`'s."""
    paths.check(run_dir, "rl.init_from")
    try:
        src, step, _, params, _, _ = load_params(run_dir, step, mesh, rules)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"rl.init_from={run_dir!r}: {e}") from None
    check_same_model(to_dict(src), cfg, run_dir)
    return step, params


class GRPORun(Run):
    """A GRPO run: the run directory (`Run`: policy state, checkpointer), the prompt iterator, the reference policy
    (beta > 0) and the jitted update."""

    def __init__(self, cfg: Config, workdir: str):
        from deepjax.data import pipeline  # lazy on purpose: grain, absent where only models run (the GPU machine)

        if cfg.data.source not in tasks.TASKS:
            raise ConfigError(f"data.source={cfg.data.source!r}: GRPO needs a generated task with a verifier "
                              f"({', '.join(tasks.TASKS)})")
        r = cfg.rl
        if r.init_from:
            paths.check(r.init_from, "rl.init_from")
        self.ref_needed = r.loss.beta > 0
        self.init_source = None

        def init_params():
            if r.init_from:
                src_step, params = restore_policy(r.init_from, r.init_step, cfg, self.mesh, self.rules)
                self.init_source = f"{paths.run_path(r.init_from, 'rl.init_from')} step {src_step}"
                return params
            self.init_source = f"random init (seed {cfg.seed})"
            return M.init_sharded(cfg.model, jax.random.key(cfg.seed), self.mesh, self.rules)[1]

        super().__init__(cfg, workdir, optim_cfg=cfg.optim if r.lr is None else dataclasses.replace(cfg.optim, lr=r.lr),
                         total_steps=r.steps * r.loss.mu, extra_items=("ref",) if self.ref_needed else (),
                         init_params=init_params)
        self.rows = r.prompts_per_step * r.loss.group_size
        n_shards = S.batch_shards(self.mesh, self.rules)
        if (self.rows // cfg.rl.micro_batches) % n_shards:
            raise ConfigError(f"rl.micro_batches={cfg.rl.micro_batches}: each micro-batch's "
                              f"{self.rows // cfg.rl.micro_batches} rows do not split over the {n_shards} batch shards")
        if self.rows % n_shards:
            self.checkpointer.close()
            raise ConfigError(f"rl.prompts_per_step x rl.loss.group_size = {self.rows} rollouts do not split evenly over "
                              f"the {n_shards} batch shards of the mesh")
        self.prompts = pipeline.prompt_iterator(cfg.data, self.sources[cfg.data.split], self.data_state)
        self.ref = self.extras.get("ref")
        if self.ref_needed and self.ref is None:
            self.ref = self.policy_copy()
        self._update = self.jit_update(make_step(self.graphdef, cfg, self.optimizer, self.schedule),
                                       update.compiler_options(jax.default_backend(), self.mesh.devices.size == 1))
        # MoE models: rollouts record each token's experts (replayed by the update, or only compared: routing_replay)
        # and with top-k truncation and rl.mask_replay, the set each token was drawn from (sampling-mask replay)
        self.sampling = dataclasses.replace(r.rollout_sampling(), record_routes=cfg.model.n_moe_layers > 0,
                                            record_support=r.mask_replay and r.rollout.top_k > 0
                                            and r.rollout.temperature > 0)
        self.rewards = r.reward

    # ------------------------------------------------------------------------------------------------- pieces
    def policy_copy(self):
        """The policy's params in new buffers (the state is donated to the update; a reference must outlive it)."""
        return jax.tree.map(jnp.copy, self.policy_params())

    def next_prompts(self) -> list[dict]:
        return [tasks.as_example(next(self.prompts)) for _ in range(self.cfg.rl.prompts_per_step)]

    def rollout_prompts(self, examples: list[dict]) -> list[list[int]]:
        """The rollout's rows: each example's prompt ids G times (rows i*G ... i*G + G-1)."""
        prompts = text.prompt_ids(self.tokenizer, self.cfg.data.template, [ex["question"] for ex in examples])
        return [p for p in prompts for _ in range(self.cfg.rl.loss.group_size)]

    def rollout(self, examples: list[dict], step: int) -> text.Completions:
        """Samples G completions per example (rows i*G ... i*G + G-1)."""
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        return text.complete(self.graphdef, self.policy_params(), self.tokenizer, self.rollout_prompts(examples), key,
                             self.sampling, self.mesh, self.rules, routes_on_device=True)

    def score(self, examples: list[dict], texts: list[str]) -> dict[str, np.ndarray]:
        G_ = self.cfg.rl.loss.group_size
        scores = [R.combined(examples[i // G_], t, self.rewards) for i, t in enumerate(texts)]
        return {k: np.asarray([s[k] for s in scores], np.float32) for k in scores[0]}

    def batch(self, ro: text.Completions, advantages: np.ndarray) -> update.Rollouts:
        Tlen = update.padded_length(ro.prompts.shape[1], ro.lengths, self.cfg.rl.rollout.max_new_tokens)
        on_device = isinstance(ro.routes, jax.Array)  # (`text.complete(routes_on_device=True)`, one process)
        b = update.rollouts_from_samples(ro.prompts, ro.prompt_lengths, ro.tokens, ro.logprobs, ro.lengths, advantages,
                                         Tlen, pad_id=self.tokenizer.pad_id, routes=None if on_device else ro.routes,
                                         support=ro.support)
        b = update.Rollouts(*(None if x is None else self.to_global(np.asarray(x)) for x in b))
        if on_device:
            routes = update.routes_on_device(ro.routes, b.segment_ids)
            b = b._replace(routes=jax.device_put(routes, S.batch_spec(self.mesh, self.rules, ndim=routes.ndim)))
        temperature = self.cfg.rl.rollout.temperature
        with self.on_mesh():
            if self.ref_needed:
                b = b._replace(ref_logp=update.jit_token_logprobs(self.graphdef, self.ref, b, temperature,
                                                                  micro_batches=self.cfg.rl.micro_batches))
            if self.cfg.rl.loss.uses_sampler:  # TIS / MIS: pi_old from the trainer, the sampler's beside it
                old = update.jit_token_logprobs(self.graphdef, self.policy_params(), b, temperature,
                                                replay_routes=self.cfg.rl.routing_replay, replay_support=True,
                                                micro_batches=self.cfg.rl.micro_batches)
                b = b._replace(old_logp=old, sampler_logp=b.old_logp)
        return b

    def update(self, batch: update.Rollouts) -> list[dict]:
        out = []
        with self.on_mesh():
            for _ in range(self.cfg.rl.loss.mu):
                self.state, m = self._update(self.state, batch)
                out.append(m)
        return [scalars(jax.device_get(m)) for m in out]

    def iteration(self, s: int) -> dict:
        """GRPO step s + 1 (evaluation and checkpoints aside): prompts, rollouts, rewards, group advantages, the mu
        updates, the reference refresh; its metrics.jsonl record (`step_record`) with the seconds of its halves:
        rollout_s (prompts, rollouts, rewards, advantages; generate_s of it the sampling alone) and update_s."""
        r, done = self.cfg.rl, s + 1
        t0 = time.perf_counter()
        examples = self.next_prompts()
        ro = self.rollout(examples, s)
        t_gen = time.perf_counter()
        scores = self.score(examples, ro.texts)
        adv = np.asarray(G.group_advantages(scores["total"], r.loss.group_size, r.loss.advantage_norm))
        t1 = time.perf_counter()
        updates = self.update(self.batch(ro, adv))
        if self.ref_needed and r.ref_refresh_every and done % r.ref_refresh_every == 0:
            self.ref = self.policy_copy()
        rec = step_record(done, examples, ro.texts, ro, scores, adv, updates, r.loss.group_size)
        rec.update(rollout_s=t1 - t0, generate_s=t_gen - t0, update_s=time.perf_counter() - t1)
        return rec

    def evaluate(self, n_problems: int, k: int) -> dict:
        examples = evaluate.held_out(self.cfg, n_problems)
        comps = evaluate.sample_completions(self.cfg, self.graphdef, self.policy_params(), self.mesh, self.rules,
                                            examples, k, self.cfg.rl.eval_sampling(), seed=self.cfg.seed,
                                            batch=max(64, self.rows), progress=False)
        return metrics.summarize(examples, comps, reward_cfg=self.cfg.rl.reward)

    def save(self, step: int, force: bool = False) -> bool:
        return super().save(step, self.prompts.get_state(), force=force,
                            extra={"ref": self.ref} if self.ref_needed else None)


def step_record(step: int, examples, texts, ro, scores, adv, updates: list[dict], group_size: int) -> dict:
    """One metrics.jsonl line: rollout statistics, then the first update's metrics (the sampler/trainer gap is
    meaningful there), the mean over the mu updates of loss / clip fraction / KL, the last one's grad norm / lr."""
    acc = scores["accuracy"].reshape(-1, group_size)
    rec = {"step": step, "reward": float(scores["total"].mean()), "accuracy": float(scores["accuracy"].mean()),
           "format": float(scores["format"].mean()), "language": float(scores["language"].mean()),
           "response_length": float(np.mean(ro.lengths)), "stopped": float(np.mean(ro.done)),
           "rechecked": float(np.mean([tasks.rechecked(t) for t in texts])),
           "solved_all": float(np.mean(acc.min(1) == 1)), "solved_none": float(np.mean(acc.max(1) == 0)),
           "adv_abs": float(np.mean(np.abs(adv)))}
    first, last = updates[0], updates[-1]
    for k in ("entropy", "sampler_trainer_logp_gap", "sampler_trainer_logp_gap_max", "routing_mismatch"):
        if k in first:
            rec[k] = first[k]
    for k in ("loss", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_max", "kl", "tis_frac", "mis_drop_frac",
              "is_weight_mean", "seq_ratio_mean"):
        if k in first:
            rec[k] = float(np.mean([u[k] for u in updates]))
    rec.update(grad_norm=last["grad_norm"], lr=last.get("lr"), applied=int(min(u["applied"] for u in updates)),
               maxvio=last["maxvio"], example=f"{examples[0]['question']} -> {texts[0][:120]}")
    return rec


def plot_grpo(history: dict[int, dict], evals: list[dict], path) -> None:
    steps = sorted(history)
    if not steps:
        return
    get = lambda k: np.array([np.nan if history[s].get(k) is None else history[s][k] for s in steps],  # noqa: E731
                             dtype=float)
    panels = [("reward", "reward (mean over rollouts)"), ("accuracy", "accuracy reward (rollouts)"),
              ("response_length", "response length (tokens)"), ("kl", "KL to reference (k3)"),
              ("clip_frac", "clip fraction"), ("entropy", "entropy (nats/token)")]
    fig = Figure(figsize=(20, 8))
    axes = fig.subplots(2, 4)
    axes = axes.ravel()
    for ax, (k, title) in zip(axes, panels):
        ax.plot(steps, get(k))
        ax.set_title(title), ax.set_xlabel("GRPO step")
    ax = axes[6]
    if evals:
        ax.plot([e["step"] for e in evals], [100 * e["pass@1"] for e in evals], "o-", label="pass@1")
        ax.plot([e["step"] for e in evals], [100 * e["cons@k"] for e in evals], "s--", label="cons@k")
        ax.legend()
    ax.set_title("held-out accuracy (%)"), ax.set_xlabel("GRPO step")
    axes[7].plot(steps, get("sampler_trainer_logp_gap"))
    axes[7].set_title("|sampler - trainer| log-prob gap"), axes[7].set_xlabel("GRPO step")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)


def eval_record(step: int, result: dict, k: int) -> dict:
    row = next(r for r in result["table"] if r["k"] == k)
    return {"step": step, "k": k, "pass@1": row["pass@1"], "pass@k": row["pass@k"], "cons@k": row["cons@k"],
            "n_problems": len(result["problems"])}


def grpo(cfg: Config, workdir, progress: bool = True) -> dict:
    """Runs (or resumes) GRPO to rl.steps; returns {"last": last step's metrics, "eval": last evaluation}."""
    run = GRPORun(cfg, workdir)
    r, t = cfg.rl, cfg.train
    start = run.resumed_from or 0
    if run.is_main:
        print(f"resumed from {run.checkpointer.step_dir(start)} (GRPO step {start})" if run.resumed_from is not None
              else f"policy: {run.init_source}", flush=True)
    streak = int(jax.device_get(run.state.nonfinite_streak))
    eval_path = run.workdir / "eval.jsonl"
    evals = truncate_jsonl(eval_path, start, write=run.is_main)  # eval.jsonl, as metrics.jsonl: each step once
    last: dict = {}
    with running(run, r.steps, start, "grpo", progress) as log:
        for s in range(start, r.steps):
            done = s + 1
            rec = run.iteration(s)
            streak = 0 if rec["applied"] else streak + 1
            if (r.eval.every and done % r.eval.every == 0) or done == r.steps:
                ev = eval_record(done, run.evaluate(r.eval.problems, r.eval.k), r.eval.k)
                evals = [e for e in evals if e["step"] != done] + [ev]
                rec.update({f"eval_{k}": v for k, v in ev.items() if k not in ("step", "k")})
                if run.is_main:
                    paths.append_text(eval_path, json.dumps(ev) + "\n")
                    log.scalars({k: v for k, v in ev.items() if k != "step"}, done, "eval")
            log.step(rec, done, "grpo", reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}",
                     len=f"{rec['response_length']:.1f}", kl=f"{rec.get('kl', 0.0):.4f}")
            last = rec
            check_streak(streak, done, t.max_nonfinite, run.checkpointer)
            if done % t.checkpoint_every == 0 or done == r.steps:
                run.save(done, force=done == r.steps)
            kill_if_asked(done, run.checkpointer)
    if run.is_main and t.plot:
        plot_grpo(log.history(), evals, run.workdir / "grpo_curves.png")
    return {"last": last, "eval": evals[-1] if evals else None}


__all__ = ["grpo", "GRPORun", "make_step", "freeze", "restore_policy", "plot_grpo", "step_record", "eval_record",
           "FROZEN"]
