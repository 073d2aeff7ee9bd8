"""`deepjax distill`: a student learns from a teacher run, by its sampled reasoning traces or by its logits.

    deepjax distill tiny --workdir runs/distill --config.distill.teacher=runs/r1zero/grpo          # traces (R1-Distill)
    deepjax distill tiny --workdir runs/kd --config.distill.teacher=runs/tiny --config.distill.mode=logits

The student is the run config's model, data, optim, train and mesh; the teacher is another run directory
(`deepjax train` / `grpo`, its newest checkpoint or distill.teacher_step), placed on the student's mesh.

mode=traces (what DeepSeek-R1-Distill is: SFT of a smaller model on R1's verified samples), in stages, each resumed
when its output exists:

1. traces (`<workdir>/traces/`): distill.prompts train-split prompts of data.source (a generated task), distill.k
   completions each from the teacher (distill.sampling: temperature 0.6, top-p 0.95 as R1), in its own prompt
   template and tokenizer. The rejection filter (`check_trace`) rejects, first failing check first:

       truncated      no EOS within sampling.max_new_tokens (always rejected: an SFT target must end)
       format         not `<think>...</think> <answer>...</answer>` (rewards.format_reward)   distill.require_format
       wrong_answer   the task's verifier rejects the answer (rewards.accuracy_reward)        distill.require_correct
       language       a word of the completion is outside distill.language ("en": every word    distill.require_language
                      all ASCII letters; words as rewards.words counts them, the R1 tags aside:
                      runs of letters, each Han / kana character one word; digits and symbols
                      are not words, so a completion without words is consistent)
       per_prompt_limit  past distill.max_per_prompt kept traces of the same prompt

   Written: traces.jsonl (one kept trace a line: question, completion verbatim, answer = the reference, task, meta,
   prompt and sample index; the `traces` data source reads it) and stats.json (kept / rejected counts by reason, how
   often each check failed whether or not it rejects, prompts with at least one trace, the settings; written last, so
   its presence means the stage is done). The TFDS dataset of the traces is built under data.data_dir (default
   <workdir>/tfds).
2. student (`<workdir>/student`, `deepjax train`'s run code): SFT on the traces (data.source=traces, data.mode=sft:
   the loss on completion tokens only, prompts in the student's data.template). From distill.student_init's
   checkpoint when set (written as the run's step-0 checkpoint), else a random init.

mode=logits (teacher and student share the tokenizer and vocabulary): one stage, `<workdir>/student`, trained on
data.source's batches with

    loss = kd_alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - kd_alpha) * CE(s, labels) [+ MTP + balance]

the KL averaged over the completion tokens (the tokens the hard-label loss counts; data.mode=sft: the completion),
T = distill.kd_temperature (the T^2 keeps the gradient's scale as T changes, Hinton et al. 2015), s / t the student's
/ teacher's logits. distill.kd_direction=reverse takes KL(softmax(s / T) || softmax(t / T)) on the same tokens
(mode-seeking). The teacher's parameters are an argument of the same jitted step, in the student's mesh shardings,
frozen (outside the train state and the optimizer); its forward runs in the step. Both models' logits are formed by
chunks of positions (as ops.lm_head_ce), each chunk rematerialized in the backward: no [B, T, V] logits are held.

On-policy distillation (GKD, Agarwal et al. 2024; Thinking Machines' on-policy distillation), distill.on_policy =
lambda in [0, 1]: the share lambda of the steps, evenly spread (`is_on_policy`: 0.5 takes steps 2, 4, ...), trains
on the student's own samples instead of the batch. Such a step reads its batch as any other (the data order does not
depend on lambda), takes each row's first document's prompt (`batch_prompts`: the tokens before its first target,
so data.mode=sft on a question/answer source; anything else is a ConfigError naming distill.on_policy), and the
student, with its current parameters, completes them (`text.complete` on the run's mesh, distill.on_policy_sampling:
temperature 1, 64 new tokens; key fold_in(key(seed), step index), so a run killed and resumed samples what the
straight run did). Rows [prompt, completion cut to data.seq_len, pad] (`samples_batch`, laid out by
`update.rollouts_from_samples`) go through the same KD step with kd_alpha = 1 (`on_policy_config`): the configured
KL (reverse is the usual on-policy choice) at the positions that predict a sampled token, and only there; no
cross-entropy (the samples have no labels). The samples are constants: no gradient flows through sampling.
metrics.jsonl then adds on_policy (1 / 0), and on on-policy steps response_length and stopped; there `loss` is the
student's cross-entropy on its own samples (reported, not trained on). lambda = 0 (the default) runs exactly the
steps above.

Then, with distill.eval_problems > 0, teacher and student are evaluated on held-out problems of data.source
(distill.eval_k samples each, temperature 0.6, top-p 0.95): `<workdir>/distill.json` holds the summary.

Restarting with the same work directory resumes: stage 1 is skipped when its stats.json exists (an error if it was
made with other settings), the student's run resumes from its newest checkpoint, so a run killed and resumed ends
bitwise equal to one that never stopped (tests/test_distill.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from deepjax.held_jit import held_jit
from deepjax import paths
from deepjax.config import Config, to_dict
from deepjax.data import tasks
from deepjax.data.tokenizer import load_tokenizer
from deepjax.errors import DataError
from deepjax.infer import sampling as SP
from deepjax.infer import text
from deepjax.model import ops
from deepjax.model.layers import dtype_of
from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S
from deepjax.rl import evaluate
from deepjax.rl import metrics as RM
from deepjax.rl import rewards
from deepjax.rl import update
from deepjax.rl.config import DistillConfig
from deepjax.schema import ConfigError
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.train import step as TS
from deepjax.train.checkpoint import list_steps

CHECKS = ("truncated", "format", "wrong_answer", "language")  # the filter's checks, in the order they reject
REASONS = CHECKS + ("per_prompt_limit",)


# ---- the rejection filter -----------------------------------------------------------------------------------------

_TAGS_RE = re.compile(r"</?(?:think|answer)>")


def language_consistent(completion: str, language: str = "en") -> bool:
    """Every word of the completion (`rewards.words`), its R1 tags aside, is in `language` (a key of
    rewards.LANGUAGES); True without words."""
    is_target = rewards.LANGUAGES[language]
    return all(is_target(w) for w in rewards.words(_TAGS_RE.sub(" ", completion)))


def failed_checks(example: dict, completion: str, finished: bool, dc: DistillConfig,
                  reward_cfg: Optional[rewards.RewardConfig] = None) -> dict[str, bool]:
    """{check: whether it fails} for one sampled completion, every check evaluated (switches aside)."""
    return {"truncated": not finished,
            "format": rewards.format_reward(example, completion, cfg=reward_cfg) != 1.0,
            "wrong_answer": rewards.accuracy_reward(example, completion, cfg=reward_cfg) != 1.0,
            "language": not language_consistent(completion, dc.language)}


def check_trace(example: dict, completion: str, finished: bool, dc: DistillConfig,
                reward_cfg: Optional[rewards.RewardConfig] = None) -> Optional[str]:
    """None when the filter keeps the trace, else the first check (in CHECKS order) that fails and is on."""
    on = {"truncated": True, "format": dc.require_format, "wrong_answer": dc.require_correct,
          "language": dc.require_language}
    failed = failed_checks(example, completion, finished, dc, reward_cfg)
    return next((c for c in CHECKS if failed[c] and on[c]), None)


def filter_traces(examples: Sequence[dict], samples: Sequence[Sequence[tuple[str, bool]]], dc: DistillConfig,
                  reward_cfg: Optional[rewards.RewardConfig] = None) -> tuple[list[dict], dict]:
    """(kept trace records, stats) of `samples[i]` = [(completion, finished), ...] for examples[i]. Records: question,
    completion, answer (the reference), task, meta, prompt (index of the example), sample (index among its k)."""
    if len(examples) != len(samples):
        raise ValueError(f"samples: {len(samples)} lists for {len(examples)} examples")
    kept: list[dict] = []
    rejected = dict.fromkeys(REASONS, 0)
    failed = dict.fromkeys(CHECKS, 0)
    with_trace = 0
    for i, (ex, outs) in enumerate(zip(examples, samples)):
        ex = tasks.as_example(ex)
        n_kept = 0
        for j, (completion, finished) in enumerate(outs):
            fails = failed_checks(ex, completion, finished, dc, reward_cfg)
            for c, f in fails.items():
                failed[c] += f
            reason = check_trace(ex, completion, finished, dc, reward_cfg)
            if reason is None and dc.max_per_prompt and n_kept >= dc.max_per_prompt:
                reason = "per_prompt_limit"
            if reason is not None:
                rejected[reason] += 1
                continue
            n_kept += 1
            kept.append({"question": ex["question"], "completion": completion, "answer": str(ex.get("answer", "")),
                         "task": ex.get("task", ""), "meta": ex.get("meta", ""), "prompt": i, "sample": j})
        with_trace += n_kept > 0
    n = sum(len(o) for o in samples)
    stats = {"prompts": len(examples), "samples": n, "kept": len(kept), "kept_share": len(kept) / max(n, 1),
             "prompts_with_a_trace": with_trace, "rejected": rejected, "failed": failed}
    return kept, stats


# ---- the logit-distillation loss ----------------------------------------------------------------------------------

def token_kl(student_logits, teacher_logits, temperature: float, direction: str = "forward"):
    """KL per position between softmax(teacher / T) and softmax(student / T) over the last axis, float32:
    forward KL(teacher || student), reverse KL(student || teacher). No T^2 here."""
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if direction == "forward":
        return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    if direction == "reverse":
        return jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
    raise ValueError(f"direction={direction!r}: forward or reverse")


def kd_loss_from_logits(student_BTV, teacher_BTV, weights_BT, temperature: float, direction: str = "forward"):
    """T^2 * sum_{b,t} weights[b,t] * KL_t (weights carry the mask and the mean's denominator): the reference form of
    `kd_loss`, on whole logits."""
    kl = token_kl(student_BTV, jax.lax.stop_gradient(teacher_BTV), temperature, direction)
    return temperature ** 2 * jnp.sum(kl * weights_BT.astype(jnp.float32))


def kd_loss(hs_BTD, ws_DV, ht_BTE, wt_EV, weights_BT, temperature: float, direction: str = "forward",
            chunk: Optional[int] = None):
    """`kd_loss_from_logits` of student logits hs @ ws and teacher logits ht @ wt (normed hidden states, heads; the
    two hidden sizes may differ), by chunks of positions along T (default ops.CE_CHUNK_TOKENS // B): each chunk's
    [B, c, V] logits are formed, reduced and, under differentiation, recomputed in the backward (jax.checkpoint), so
    no [B, T, V] array is held. The teacher gets no gradient."""
    B, T, _ = hs_BTD.shape
    c = chunk or max(1, min(T, ops.CE_CHUNK_TOKENS // B))
    n = -(-T // c)
    pad = n * c - T
    ht_BTE, wt_EV = jax.lax.stop_gradient(ht_BTE), jax.lax.stop_gradient(wt_EV)
    weights_BT = weights_BT.astype(jnp.float32)
    if pad:
        hs_BTD, ht_BTE = (jnp.pad(h, ((0, 0), (0, pad), (0, 0))) for h in (hs_BTD, ht_BTE))
        weights_BT = jnp.pad(weights_BT, ((0, 0), (0, pad)))
    split = lambda a: jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def chunk_kl(ws, wt, hs_BCD, ht_BCE, w_BC):
        s_BCV = S.constrain(jnp.einsum("bcd,dv->bcv", hs_BCD, ws, preferred_element_type=jnp.float32),
                            ("batch", "length", "vocab"))
        t_BCV = S.constrain(jnp.einsum("bce,ev->bcv", ht_BCE, wt, preferred_element_type=jnp.float32),
                            ("batch", "length", "vocab"))
        return jnp.sum(token_kl(s_BCV, t_BCV, temperature, direction) * w_BC)

    def body(acc, xs):
        return acc + chunk_kl(ws_DV, wt_EV, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hs_BTD), split(ht_BTE), split(weights_BT)))
    return temperature ** 2 * total


def kd_lm_loss(trainable, bias, teacher, graphdef, t_graphdef, batch: TS.Batch, cfg, t_cfg, dc: DistillConfig,
               mtp_lambda: float, balance_alpha: float, experts_fn=None, denoms=None, share: float = 1.0):
    """(total, (metrics, loads)) as `step.lm_loss`, with the main head's cross-entropy replaced by
    kd_alpha * kd_loss + (1 - kd_alpha) * CE on the same targets (the MTP and balance terms as in training)."""
    D = cfg.num_nextn_predict_layers
    pairs = []
    for k in range(1 + D):
        t_k, v_k = TS.depth_targets(batch, k)
        m_k = v_k.astype(jnp.float32)
        pairs.append((t_k, m_k / jnp.maximum(m_k.sum() if denoms is None else denoms[k], 1.0)))
    student = nnx.merge(graphdef, nnx.merge_state(trainable, bias))
    out = student(batch.tokens, batch.positions, batch.segment_ids, experts_fn, tuple(pairs))
    # the teacher's forward: its hidden states only (zero-weight targets: no [B, T, V] logits are formed)
    tm = nnx.merge(t_graphdef, teacher)
    zero = (jnp.zeros_like(batch.tokens), jnp.zeros(batch.tokens.shape, jnp.float32))
    t_out = tm(batch.tokens, batch.positions, batch.segment_ids, None, (zero,) * (1 + t_cfg.num_nextn_predict_layers))
    kd = kd_loss(student.norm(out.hidden), student.head[...].astype(dtype_of(cfg.dtype)), tm.norm(t_out.hidden),
                 tm.head[...].astype(dtype_of(t_cfg.dtype)), pairs[0][1], dc.kd_temperature, dc.kd_direction)
    ce = out.ce[0]
    mtp = out.ce[1:].sum() * mtp_lambda / D if D else jnp.zeros((), jnp.float32)
    bal = out.balance_loss.sum()
    if out.mtp_balance_loss is not None:
        bal = bal + out.mtp_balance_loss.sum()
    bal = balance_alpha * bal * share
    main = dc.kd_alpha * kd + (1.0 - dc.kd_alpha) * ce
    metrics = {"loss": ce, "kd_loss": kd, "objective": main, "mtp_loss": mtp, "balance_loss": bal,
               "dropped_tokens": out.dropped_tokens, "target_tokens": (pairs[0][1] > 0).sum().astype(jnp.float32)}
    return main + mtp + bal, (metrics, (out.expert_load, out.mtp_expert_load))


def make_kd_step(graphdef, cfg, t_graphdef, t_cfg, optimizer, dc: DistillConfig, lr_schedule=None, *,
                 micro_batches: int = 1, mtp_lambda: float = 0.3, balance_alpha: float = 1e-4,
                 bias_update_speed: float = 1e-3, experts_fn=None):
    """step(state, teacher_params, batch) -> (state, metrics), pure; jit it with the state donated. As
    `step.make_train_step` (micro-batches, the non-finite guard, the router-bias rule) with `kd_lm_loss`; metrics add
    kd_loss (T^2 KL, mean over the completion tokens) and objective (the mixed main-head loss); `loss` stays the
    hard-label cross-entropy."""
    grad_fn = jax.value_and_grad(kd_lm_loss, has_aux=True)

    def grads_of(state, teacher, b, denoms=None):
        (_, (metrics, loads)), grads = grad_fn(state.params, state.router_bias, teacher, graphdef, t_graphdef, b, cfg,
                                               t_cfg, dc, mtp_lambda, balance_alpha, experts_fn, denoms,
                                               1.0 / micro_batches)
        return grads, metrics, loads

    def step(state: TS.TrainState, teacher, batch: TS.Batch):
        if micro_batches == 1:
            grads, metrics, loads = grads_of(state, teacher, batch)
        else:
            denoms = TS.target_counts(batch, cfg.num_nextn_predict_layers)
            split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]),
                                 batch)

            def body(acc, b):
                return jax.tree.map(jnp.add, acc, grads_of(state, teacher, b, denoms)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                grads_of, state, teacher, jax.tree.map(lambda x: x[0], split), denoms))
            (grads, metrics, loads), _ = jax.lax.scan(body, zeros, split)
        total = metrics["objective"] + metrics["mtp_loss"] + metrics["balance_loss"]
        bias = TS.update_router_bias(state.router_bias, loads, bias_update_speed) if bias_update_speed else \
            state.router_bias
        applied = state.step - state.nonfinite_total
        new, grad_norm, finite = TS.guarded_update(state, grads, total, optimizer, bias)
        metrics = dict(metrics, grad_norm=grad_norm, applied=finite.astype(jnp.int32),
                       maxvio=TS.max_violation(loads[0]))
        if loads[1] is not None:
            metrics["maxvio_mtp"] = TS.max_violation(loads[1])
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(applied), jnp.float32)
        return new, metrics

    return step


# ---- the teacher, the student's start --------------------------------------------------------------------------

def load_teacher(dc: DistillConfig, mesh, rules):
    """(teacher config, step, graphdef, params with router biases) of distill.teacher, placed on `mesh`."""
    if not dc.teacher:
        raise ConfigError("distill.teacher=None: set the teacher's run directory (--config.distill.teacher=DIR)")
    paths.check(dc.teacher, "distill.teacher")
    try:
        tcfg, step, graphdef, params, _, _ = TR.load_params(dc.teacher, dc.teacher_step, mesh, rules)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"distill.teacher={dc.teacher!r}: {e}") from None
    return tcfg, step, graphdef, params


class _StudentInit(TR.Run):
    """The student's run directory with distill.student_init's parameters as its initial state (a fresh run only)."""

    def __init__(self, cfg: Config, workdir):
        dc = cfg.distill
        paths.check(dc.student_init, "distill.student_init")

        def init_params():
            try:
                src, _, _, params, _, _ = TR.load_params(dc.student_init, dc.student_init_step, self.mesh, self.rules)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"distill.student_init={dc.student_init!r}: {e}") from None
            TR.check_same_model(to_dict(src), cfg, dc.student_init)
            return params

        super().__init__(cfg, workdir, init_params=init_params)


def init_student(cfg: Config, student_dir) -> None:
    """With distill.student_init, a fresh student run directory gets that checkpoint's parameters as its step-0
    checkpoint (optimizer state at its init), which the training run then resumes from."""
    if not cfg.distill.student_init or list_steps(paths.Path(student_dir) / "checkpoints"):
        return
    run = _StudentInit(cfg, student_dir)
    try:
        if run.resumed_from is None:
            run.save(0, None, force=True)
            if run.is_main:
                print(f"      student initialized from {cfg.distill.student_init} (its step-0 checkpoint)", flush=True)
    finally:
        run.checkpointer.close()


# ---- stage 1: traces ----------------------------------------------------------------------------------------------

def trace_settings(cfg: Config) -> dict:
    """What the traces depend on (stats.json keeps it; a resumed run with other settings is refused)."""
    dc, d = cfg.distill, cfg.data
    keep = ("teacher_step", "prompts", "k", "sampling", "batch", "require_correct", "require_format",
            "require_language", "language", "max_per_prompt")
    s = {k: getattr(dc, k) for k in keep}
    s["sampling"] = dataclasses.asdict(dc.sampling)
    s.update(teacher=str(paths.run_path(dc.teacher, "distill.teacher")), seed=cfg.seed, source=d.source,
             task_seed=d.task_seed, num_train=d.num_train, **tasks.options_of(d),
             reward=dataclasses.asdict(cfg.rl.reward))
    return json.loads(json.dumps(s))  # tuples as lists: comparable with what stats.json gives back


def train_prompts(cfg: Config) -> list[dict]:
    d = cfg.data
    if d.source not in tasks.TASKS:
        raise ConfigError(f"data.source={d.source!r}: distill.mode='traces' samples prompts of a generated task with "
                          f"a verifier ({', '.join(tasks.TASKS)})")
    n = cfg.distill.prompts or d.num_train
    return tasks.generate(d.source, n, d.task_seed, "train", **tasks.options_of(d))


def sample(tcfg: Config, graphdef, params, mesh, rules, questions: Sequence[str], k: int, sc: SP.SamplingConfig,
           seed: int, batch: int, progress: bool = True, desc: str = "traces") -> list[list[tuple[str, bool]]]:
    """k (completion, finished) pairs per question from a model in `tcfg`'s template and tokenizer: rows in batches
    of a fixed shape (one compilation), each batch's key fold_in(key(seed), batch index)."""
    tok = load_tokenizer(tcfg.data.tokenizer)
    prompts = text.prompt_ids(tok, tcfg.data.template, questions)
    rows = [p for p in prompts for _ in range(k)]
    shards = S.batch_shards(mesh, rules)
    batch = max(shards, batch // shards * shards)
    pad_to = max(8, -(-max(len(p) for p in prompts) // 8) * 8)
    out: list[tuple[str, bool]] = []
    for b, start in enumerate(tqdm(range(0, len(rows), batch), desc=desc, unit="batch", disable=not progress)):
        chunk = rows[start:start + batch]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n_real)
        c = text.complete(graphdef, params, tok, chunk, jax.random.fold_in(jax.random.key(seed), b), sc, mesh, rules,
                          pad_multiple=pad_to)
        out += [(c.texts[i], bool(c.done[i])) for i in range(n_real)]
    return [out[i * k:(i + 1) * k] for i in range(len(questions))]


def write_traces(cfg: Config, workdir, progress: bool = True) -> dict:
    """Stage 1: <workdir>/traces/{traces.jsonl, stats.json}; returns the stats (read back when already done)."""
    dc = cfg.distill
    out = paths.Path(workdir) / "traces"
    stats_path, traces_path = out / "stats.json", out / "traces.jsonl"
    settings = trace_settings(cfg)
    if stats_path.exists() and traces_path.exists():
        stats = json.loads(stats_path.read_text())
        if stats.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(stats.get("settings", {}))
                          if settings.get(k) != stats.get("settings", {}).get(k))
            raise ConfigError(f"distill: {stats_path} holds traces made with other settings ({', '.join(diff)}); "
                              f"use a new --workdir")
        stats["resumed"] = True
        return stats
    examples = train_prompts(cfg)
    mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    tcfg, tstep, graphdef, params = load_teacher(dc, mesh, rules)
    t0 = time.perf_counter()
    samples = sample(tcfg, graphdef, params, mesh, rules, [ex["question"] for ex in examples], dc.k, dc.sampling,
                     cfg.seed, dc.batch, progress)
    del params
    kept, stats = filter_traces(examples, samples, dc, cfg.rl.reward)
    stats.update(teacher_step=tstep, sample_s=time.perf_counter() - t0, settings=settings)
    if not kept:
        why = ", ".join(f"{r} {n}" for r, n in stats["rejected"].items() if n)
        raise DataError(f"distill: the filter kept none of the teacher's {stats['samples']} samples (rejected: {why}); "
                        f"train the teacher further, or relax distill.require_correct / require_format / "
                        f"require_language")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(traces_path, "".join(json.dumps(r) + "\n" for r in kept))
        paths.write_text_atomic(stats_path, json.dumps(stats, indent=1))  # last: the stage's done marker
    return stats


def student_config(cfg: Config, workdir) -> Config:
    """The student's run config for mode=traces: SFT on <workdir>/traces/traces.jsonl."""
    rewrites = {k: 0.0 for k in ("freeform_share", "slip_share", "recheck_share") if hasattr(cfg.data, k)}
    data = dataclasses.replace(cfg.data, source="traces", path=str(paths.Path(workdir) / "traces" / "traces.jsonl"),
                               mode="sft", split="train", **rewrites)  # the completions as sampled
    return dataclasses.replace(cfg, data=data)


# ---- on-policy steps (mode=logits, distill.on_policy > 0) --------------------------------------------------------

def check_on_policy(cfg: Config) -> None:
    """distill.on_policy > 0 needs mode=logits and prompts in data.source's batches: a question/answer source (not
    `text`) in data.mode=sft, whose target mask marks where each prompt ends. A ConfigError naming the field."""
    dc, d = cfg.distill, cfg.data
    if not dc.on_policy:
        return
    why = None
    if dc.mode != "logits":
        why = "on-policy steps are part of logit distillation: set distill.mode=logits (or distill.on_policy=0)"
    elif d.source == "text":
        why = ("the student samples completions of the batch's prompts, and data.source='text' has no prompts: use a "
               "question/answer source (arithmetic, countdown, jsonl_math, traces), or distill.on_policy=0")
    elif d.mode != "sft":
        why = (f"the batch's prompts are the tokens before each document's first target, and data.mode={d.mode!r} "
               f"makes every token a target: use data.mode=sft, or distill.on_policy=0")
    if why:
        raise ConfigError(f"distill.on_policy={dc.on_policy:g}: {why}")


def is_on_policy(step: int, share: float) -> bool:
    """Whether training step `step` (1-based) is on-policy: the share `share` of the steps, evenly spread (step s when
    floor(s * share) > floor((s - 1) * share): share 0.5 takes steps 2, 4, ...; 1 every step; 0 none). A function of
    the step alone, so a resumed run takes the same steps."""
    return share > 0 and math.floor(step * share) > math.floor((step - 1) * share)


def on_policy_config(dc: DistillConfig) -> DistillConfig:
    """The settings of an on-policy step's loss: the KD term alone (kd_alpha 1). The student's samples have no hard
    labels (a cross-entropy on them would train the student towards itself); direction and T as configured."""
    return dataclasses.replace(dc, kd_alpha=1.0)


def batch_prompts(tokens_BT, segment_ids_BT, target_mask_BT) -> list[list[int]]:
    """Each row's first document's prompt (numpy in): its tokens before its first target, which with data.mode=sft is
    [BOS] template(question) (deepjax/data/pipeline.py). A DataError for a row without one."""
    tokens, segments, mask = (np.asarray(x) for x in (tokens_BT, segment_ids_BT, target_mask_BT))
    out = []
    for b in range(tokens.shape[0]):
        doc = segments[b] == segments[b, 0]
        n = int(np.argmin(doc)) if not doc.all() else len(doc)  # the first document: the row's first n tokens
        targets = np.flatnonzero(mask[b, :n])
        p = int(targets[0]) if len(targets) else 0
        if segments[b, 0] == 0 or p == 0:
            raise DataError(f"distill.on_policy: row {b} of the batch has no prompt (no tokens before its first "
                            f"document's first target)")
        out.append(tokens[b, :p].tolist())
    return out


def samples_batch(c: text.Completions, seq_len: int, pad_id: int) -> TS.Batch:
    """The student's samples as training rows of seq_len (numpy): each row its prompt then its completion (EOS
    included, cut to fit seq_len), then pad_id; the completion tokens are the targets (`update.rollouts_from_samples`
    lays them out). The KD loss then counts the positions that predict a sampled token, and only those."""
    lengths = np.minimum(np.asarray(c.lengths), seq_len - np.asarray(c.prompt_lengths))
    r = update.rollouts_from_samples(c.prompts, c.prompt_lengths, c.tokens, c.logprobs, lengths,
                                     np.zeros(len(lengths), np.float32), seq_len, pad_id=pad_id)
    return TS.Batch(r.tokens, r.segment_ids, r.positions, r.completion_mask)


# ---- stage 2 (logits): the KD run ---------------------------------------------------------------------------------

class KDRun(T.TrainRun):
    """A training run (`TrainRun`: the student's state, data, checkpoints) whose step is `make_kd_step`, with the
    teacher's parameters on the student's mesh; with distill.on_policy > 0 also the on-policy step
    (`on_policy_config`) and the student's samples it trains on (`student_samples`)."""

    def __init__(self, cfg: Config, workdir):
        check_on_policy(cfg)
        super().__init__(cfg, workdir)
        try:
            tcfg, self.teacher_step, self.t_graphdef, self.teacher = load_teacher(cfg.distill, self.mesh, self.rules)
            check_same_vocabulary(cfg, tcfg)
        except Exception:
            self.checkpointer.close()
            raise
        t = cfg.train

        def jitted(dc: DistillConfig):  # jit compiles on the first call: the on-policy step only if one runs
            with self.on_mesh():
                fn = make_kd_step(self.graphdef, cfg.model, self.t_graphdef, tcfg.model, self.optimizer, dc,
                                  self.schedule, micro_batches=cfg.optim.micro_batches, mtp_lambda=t.mtp_lambda,
                                  balance_alpha=t.balance_alpha, bias_update_speed=t.bias_update_speed)
                return held_jit(fn, donate_argnums=0, out_shardings=(self.state_shardings, None))

        self._kd = jitted(cfg.distill)
        self._kd_on_policy = jitted(on_policy_config(cfg.distill)) if cfg.distill.on_policy else None

    def step(self, batch: TS.Batch, on_policy: bool = False):
        with self.on_mesh():
            self.state, metrics = (self._kd_on_policy if on_policy else self._kd)(self.state, self.teacher, batch)
        return metrics

    def student_samples(self, batch: TS.Batch, s: int) -> tuple[TS.Batch, dict]:
        """Step s + 1's on-policy batch: the student (its current parameters) completes each row's prompt
        (`batch_prompts`) with distill.on_policy_sampling and the key fold_in(key(seed), s), a function of the run's
        seed and the step only (a resumed run samples what the straight one did); the rows as `samples_batch`. Also
        {response_length, stopped}: the mean completion length (EOS included) and the share that ended with EOS."""
        tokens, segments, mask = (D.host_array(x) for x in (batch.tokens, batch.segment_ids, batch.target_mask))
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), s)
        c = text.complete(self.graphdef, self.policy_params(), self.tokenizer, batch_prompts(tokens, segments, mask),
                          key, self.cfg.distill.on_policy_sampling, self.mesh, self.rules)
        rows = samples_batch(c, self.cfg.data.seq_len, self.tokenizer.pad_id)
        return (TS.Batch(*(self.to_global(x) for x in rows)),
                {"response_length": float(np.mean(c.lengths)), "stopped": float(np.mean(c.done))})


def check_same_vocabulary(cfg: Config, tcfg: Config) -> None:
    if tcfg.model.vocab_size != cfg.model.vocab_size or tcfg.data.tokenizer != cfg.data.tokenizer:
        raise ConfigError(f"distill.mode='logits' needs the teacher's vocabulary: model.vocab_size="
                          f"{cfg.model.vocab_size}, data.tokenizer={cfg.data.tokenizer!r} but the teacher "
                          f"{cfg.distill.teacher} has {tcfg.model.vocab_size}, {tcfg.data.tokenizer!r} "
                          f"(use distill.mode=traces across tokenizers)")


def kd_train(cfg: Config, workdir, progress: bool = True) -> dict:
    """Runs (or resumes) logit distillation to train.steps; returns the last step's metrics."""
    run = KDRun(cfg, workdir)
    t = cfg.train
    start = int(jax.device_get(run.state.step))
    streak = int(jax.device_get(run.state.nonfinite_streak))
    if run.resumed_from is not None and run.is_main:
        print(f"resumed from {run.checkpointer.step_dir(run.resumed_from)} (step {start})", flush=True)
    share = cfg.distill.on_policy
    last: dict = {}
    with TR.running(run, t.steps, start, "distill", progress) as log:
        for s in range(start, t.steps):
            done = s + 1
            batch, data_hash = run.next_batch()  # every step reads one: the data order is independent of on_policy
            on = is_on_policy(done, share)
            sampled = {}
            if on:
                batch, sampled = run.student_samples(batch, s)
            rec = TR.scalars(jax.device_get(run.step(batch, on_policy=on)))
            rec.update(step=done, data=data_hash)
            if share:
                rec.update(on_policy=int(on), **sampled)
            streak = 0 if rec["applied"] else streak + 1
            log.step(rec, done, "distill", loss=f"{rec['loss']:.4f}", kd=f"{rec['kd_loss']:.4f}")
            last = rec
            TR.check_streak(streak, done, t.max_nonfinite, run.checkpointer)
            if done % t.checkpoint_every == 0 or done == t.steps:
                run.save(done, run.iterator.get_state(), force=done == t.steps)
            TR.kill_if_asked(done, run.checkpointer)
    if run.is_main and t.plot:
        T.plot_curves(log.history(), run.workdir / "train_curves.png")
    return last


# ---- the evaluation and the job -----------------------------------------------------------------------------------

def held_out_eval(cfg: Config, model_cfg: Config, graphdef, params, mesh, rules, progress: bool = True) -> dict:
    """pass@1 / cons@k / pass@k (r1zero.breakdown) on distill.eval_problems held-out problems of cfg.data's task,
    sampled in model_cfg's template and tokenizer."""
    from deepjax.rl.r1zero import breakdown  # lazy on purpose: r1zero imports the training stack

    dc = cfg.distill
    examples = evaluate.held_out(cfg, dc.eval_problems)
    sc = SP.SamplingConfig(max_new_tokens=dc.sampling.max_new_tokens, temperature=0.6, top_p=0.95)
    comps = sample(model_cfg, graphdef, params, mesh, rules, [ex["question"] for ex in examples], dc.eval_k, sc,
                   cfg.seed, dc.batch, progress, desc="eval")
    res = RM.summarize(examples, [[c for c, _ in row] for row in comps], reward_cfg=cfg.rl.reward)
    return breakdown(res)


def run(cfg: Config, workdir, progress: bool = True) -> dict:
    """Runs (or resumes) the distillation of the module docstring in `workdir`; returns the summary written to
    <workdir>/distill.json."""
    dc = cfg.distill
    workdir = paths.run_path(workdir)
    if not dc.teacher:
        raise ConfigError("distill.teacher=None: set the teacher's run directory (--config.distill.teacher=DIR)")
    check_on_policy(cfg)
    paths.check(dc.teacher, "distill.teacher")
    if not (paths.run_path(dc.teacher, "distill.teacher") / "config.json").exists():
        raise FileNotFoundError(f"distill.teacher={dc.teacher!r}: not a deepjax run directory (no config.json)")
    TR.check_data_dir(cfg.data.data_dir)
    if dc.mode == "traces" and paths.is_remote(workdir):
        raise paths.StorageError(f"--workdir={str(workdir)}: distill.mode='traces' reads its traces.jsonl "
                                 f"as a local data file; use a local work directory")
    if cfg.data.data_dir is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=TR.default_data_dir(workdir)))
    student_dir = workdir / "student"
    times: dict = {}
    summary: dict = {"mode": dc.mode, "teacher": str(paths.run_path(dc.teacher, "distill.teacher")),
                     "workdir": str(workdir)}
    if (dc.mode == "traces" or dc.eval_problems) and cfg.data.source not in tasks.TASKS:
        why = "samples prompts of" if dc.mode == "traces" else "evaluates (distill.eval_problems > 0; 0: no eval) on"
        raise ConfigError(f"data.source={cfg.data.source!r}: distill {why} a generated task with a verifier "
                          f"({', '.join(tasks.TASKS)})")
    n_stages = 1 + (dc.mode == "traces") + (dc.eval_problems > 0)
    if dc.mode == "traces":
        t0 = time.perf_counter()
        print(f"[1/{n_stages}] traces: {dc.k} samples x {dc.prompts or cfg.data.num_train} {cfg.data.source} prompts "
              f"from the teacher {summary['teacher']}, filtered -> {workdir / 'traces'}", flush=True)
        stats = write_traces(cfg, workdir, progress)
        times["traces_s"] = time.perf_counter() - t0
        summary["traces"] = stats
        if stats.get("resumed"):
            print(f"      traces already there: {stats['kept']} kept of {stats['samples']}", flush=True)
        scfg = student_config(cfg, workdir)
        t0 = time.perf_counter()
        print(f"[2/{n_stages}] student: SFT on {stats['kept']} traces, {cfg.train.steps} steps -> {student_dir}",
              flush=True)
        init_student(scfg, student_dir)
        summary["student"] = T.train(scfg, student_dir, progress=progress)
        times["student_s"] = time.perf_counter() - t0
    else:
        scfg = cfg
        t0 = time.perf_counter()
        on = f", on-policy share {dc.on_policy:g}" if dc.on_policy else ""
        print(f"[1/{n_stages}] student: logit distillation ({dc.kd_direction} KL at T={dc.kd_temperature:g}, "
              f"alpha {dc.kd_alpha:g}{on}), {cfg.train.steps} steps -> {student_dir}", flush=True)
        init_student(scfg, student_dir)
        summary["student"] = kd_train(scfg, student_dir, progress=progress)
        times["student_s"] = time.perf_counter() - t0
    if dc.eval_problems:
        t0 = time.perf_counter()
        print(f"[{n_stages}/{n_stages}] evaluating teacher and student: {dc.eval_problems} held-out problems x "
              f"{dc.eval_k} samples", flush=True)
        mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
        tcfg, tstep, graphdef, params = load_teacher(dc, mesh, rules)
        summary["teacher_step"] = tstep
        teacher_eval = held_out_eval(cfg, tcfg, graphdef, params, mesh, rules, progress)
        del params
        _, sstep, graphdef, params, _, _ = TR.load_params(student_dir, None, mesh, rules)
        summary["eval"] = {"teacher": teacher_eval,
                           "student": held_out_eval(cfg, scfg, graphdef, params, mesh, rules, progress)}
        summary["student_step"] = sstep
        times["eval_s"] = time.perf_counter() - t0
    summary["times"] = times
    if jax.process_index() == 0:
        paths.write_text_atomic(workdir / "distill.json", json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict) -> str:
    """The lines `deepjax distill` prints at the end."""
    lines = []
    st = summary.get("traces")
    if st:
        why = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in st["rejected"].items() if n) or "none"
        lines.append(f"traces: {st['kept']} of {st['samples']} kept ({100 * st['kept_share']:.1f}%; "
                     f"{st['prompts_with_a_trace']} of {st['prompts']} prompts); rejected: {why}")
    last = summary.get("student") or {}
    if last:
        kd = f", KD loss {last['kd_loss']:.4f}" if "kd_loss" in last else ""
        lines.append(f"student step {last['step']}: loss {last['loss']:.4f}{kd}")
    ev = summary.get("eval")
    if ev:
        t, s = ev["teacher"], ev["student"]
        lines.append(f"held-out ({t['n_problems']} problems, k={t['k']}): pass@1 student {100 * s['pass@1']:.1f}% "
                     f"vs teacher {100 * t['pass@1']:.1f}%; cons@{t['k']} {100 * s['cons@k']:.1f}% vs "
                     f"{100 * t['cons@k']:.1f}%")
    return "\n".join(lines)


__all__ = ["run", "write_traces", "filter_traces", "check_trace", "failed_checks", "language_consistent",
           "token_kl", "kd_loss", "kd_loss_from_logits", "kd_lm_loss", "make_kd_step", "KDRun", "kd_train",
           "check_on_policy", "is_on_policy", "on_policy_config", "batch_prompts", "samples_batch",
           "student_config", "trace_settings", "init_student", "load_teacher", "format_summary", "CHECKS", "REASONS"]
