"""R1-style evaluation metrics: unbiased pass@k, pass@1 over k samples, cons@k (majority vote), test-time scaling.

Pure Python + numpy (matplotlib only inside `plot_scaling`): importable without jax, grain or tfds.

R1 (docs/deepseek.md, R1: evaluation) samples k completions per question at temperature 0.6 / top-p 0.95 and reports

    pass@1  = mean over problems of (correct samples / k)                         -> `pass1_from_samples`
    cons@k  = accuracy of the majority-vote answer of the k samples               -> `cons_at_k`

and we add the unbiased pass@k estimator of Chen et al. 2021 (Codex), `pass_at_k(n, c, k)` = the probability that at
least one of k samples drawn without replacement from n samples with c correct ones is correct.

    table = scaling_table(correct, answers, references)   # one row per k in (1, 2, 4, ..., n)
    plot_scaling(table, "scaling.png")
    report = summarize(examples, completions_per_problem)  # from task examples and completion strings

Conventions (everything is deterministic):
- cons@k and the pass@1 column of the scaling table use the FIRST k samples of each problem (the samples are i.i.d.,
  so any fixed subset is as good as another); pass@k uses all n samples (the unbiased estimator).
- Majority vote: None answers (nothing extracted) do not vote. Answers are grouped greedily in order: an answer joins
  the first existing group whose first member it equals or `match`es, else it opens a new group. The group with the
  most votes wins; a tie goes to the group whose first member occurs earliest. The winner is that first member.
  A problem with no answer at all has majority None, which is never correct.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence

import numpy as np

from deepjax.data import tasks
from deepjax.rl import rewards

Match = Callable[[str, str], bool]


# ---------------------------------------------------------------------------------------------------------- pass@k


def _nonneg_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be a non-negative integer, not a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: must be a non-negative integer") from None
    if value < 0:
        raise ValueError(f"{name}={value}: must be non-negative")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a binomial coefficient. Requires 0 <= c <= n and
    1 <= k <= n (k = 0 is rejected: "at least one of zero samples" is always false and never what is meant).
    """
    n, c, k = _nonneg_int("n", n), _nonneg_int("c", c), _nonneg_int("k", k)
    if n == 0:
        raise ValueError("n=0: need at least one sample")
    if c > n:
        raise ValueError(f"c={c}: more correct samples than samples (n={n})")
    if k == 0:
        raise ValueError("k=0: must be at least 1")
    if k > n:
        raise ValueError(f"k={k}: larger than the number of samples n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def _check_correct(correct: Sequence[Sequence[bool]]) -> list[list[bool]]:
    if len(correct) == 0:
        raise ValueError("correct: no problems")
    out = [[bool(x) for x in row] for row in correct]
    for i, row in enumerate(out):
        if not row:
            raise ValueError(f"correct: problem {i} has no samples")
    return out


def pass1_from_samples(correct: Sequence[Sequence[bool]]) -> float:
    """R1's pass@1: the mean over problems of (correct samples / samples of that problem)."""
    rows = _check_correct(correct)
    return float(np.mean([sum(row) / len(row) for row in rows]))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, each from all its samples (`pass_at_k(len(row), sum(row), k)`)."""
    rows = _check_correct(correct)
    return float(np.mean([pass_at_k(len(row), sum(row), k) for row in rows]))


# ---------------------------------------------------------------------------------------------------------- cons@k


def _same(a: str, b: str, match: Match) -> bool:
    return a == b or bool(match(a, b))


def vote(answers: Sequence[Optional[str]], match: Match = tasks.answers_match) -> list[tuple[str, int]]:
    """The vote groups of `answers` as (first member, votes), in order of first occurrence (see the module doc)."""
    groups: list[list] = []  # [representative, count]
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if _same(answer, group[0], match):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    return [(rep, count) for rep, count in groups]


def majority_answer(answers: Sequence[Optional[str]], match: Match = tasks.answers_match) -> Optional[str]:
    """The majority answer, ignoring None; equivalent answers (under `match`) vote together; a tie goes to the group
    that occurs first. Returns that group's first member, or None if no answer was given."""
    groups = vote(answers, match)
    if not groups:
        return None
    best = max(count for _, count in groups)
    return next(rep for rep, count in groups if count == best)  # earliest first occurrence among the tied


def _check_k(k, available: int, what: str) -> int:
    k = _nonneg_int("k", k)
    if k == 0:
        raise ValueError("k=0: must be at least 1")
    if k > available:
        raise ValueError(f"k={k}: larger than the {available} samples of {what}")
    return k


def _per_problem(match: Match | Sequence[Match], n: int) -> list[Match]:
    if callable(match):
        return [match] * n
    match = list(match)
    if len(match) != n:
        raise ValueError(f"match: {len(match)} match functions for {n} problems")
    return match


def cons_at_k(answers_per_problem: Sequence[Sequence[Optional[str]]], references: Sequence[str], k: int,
              match: Match | Sequence[Match] = tasks.answers_match,
              judge: Optional[Callable[[int, str], bool]] = None) -> float:
    """cons@k: the share of problems whose majority answer over their first k answers is correct.

    `match(a, b)` groups equivalent answers in the vote (one function, or a list with one per problem) and decides
    correctness: `match(majority, references[i])`, or `judge(i, majority)` when given (e.g. countdown, where any valid
    expression is right). k may be below the number of answers; problems may have different numbers of answers >= k.
    """
    if len(answers_per_problem) != len(references):
        raise ValueError(f"references: {len(references)} references for {len(answers_per_problem)} problems")
    if len(answers_per_problem) == 0:
        raise ValueError("answers_per_problem: no problems")
    matches = _per_problem(match, len(answers_per_problem))
    hits = 0
    for i, answers in enumerate(answers_per_problem):
        _check_k(k, len(answers), f"problem {i}")
        majority = majority_answer(list(answers)[:k], matches[i])
        if majority is not None:
            hits += bool(judge(i, majority)) if judge is not None else _same(majority, references[i], matches[i])
    return hits / len(answers_per_problem)


# -------------------------------------------------------------------------------------------------- scaling table


def default_ks(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n, with n itself added when it is not a power of two."""
    n = _nonneg_int("n", n)
    if n == 0:
        raise ValueError("n=0: need at least one sample")
    ks = [1 << e for e in range(n.bit_length()) if 1 << e <= n]
    return tuple(ks if ks[-1] == n else ks + [n])


def scaling_table(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[Optional[str]]],
                  references: Sequence[str], ks: Optional[Sequence[int]] = None,
                  match: Match | Sequence[Match] = tasks.answers_match,
                  judge: Optional[Callable[[int, str], bool]] = None) -> list[dict]:
    """Test-time scaling: one row {"k", "pass@k", "cons@k", "pass@1"} per k (default 1, 2, 4, ... up to the fewest
    samples of any problem).

    pass@k: unbiased estimator from all samples, averaged over problems. cons@k: majority vote of the first k answers
    (`cons_at_k`). pass@1: R1's pass@1 over the first k samples (its expectation does not depend on k; its spread
    shrinks as k grows), so at k = n it equals the k = 1 row's pass@k (pass@1 from all samples).
    """
    rows = _check_correct(correct)
    if len(answers) != len(rows):
        raise ValueError(f"answers: {len(answers)} problems, correct has {len(rows)}")
    for i, (row, ans) in enumerate(zip(rows, answers)):
        if len(ans) != len(row):
            raise ValueError(f"answers: problem {i} has {len(ans)} answers but {len(row)} correctness flags")
    n_min = min(len(row) for row in rows)
    ks = default_ks(n_min) if ks is None else tuple(_check_k(k, n_min, "the smallest problem") for k in ks)
    table = []
    for k in ks:
        table.append({
            "k": k,
            "pass@k": mean_pass_at_k(rows, k),
            "cons@k": cons_at_k(answers, references, k, match=match, judge=judge),
            "pass@1": pass1_from_samples([row[:k] for row in rows]),
        })
    return table


def plot_scaling(table: Sequence[dict], path, title: str = "Test-time scaling") -> str:
    """Save a PNG of pass@k, cons@k and pass@1 against k (log2 x-axis) to `path`; returns the path as a string."""
    if not table:
        raise ValueError("table: empty")
    ks = [row["k"] for row in table]
    from matplotlib.figure import Figure  # lazy on purpose: the metrics import with the standard library only

    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    ax = fig.subplots()
    for key, style in (("pass@k", "o-"), ("cons@k", "s-"), ("pass@1", "^--")):
        ax.plot(ks, [100 * row[key] for row in table], style, label=key)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)


# ------------------------------------------------------------------------------------------------------- summarize


def vote_answer(example: dict, completion: str) -> Optional[str]:
    """The answer that `completion` votes for: `tasks.extract_answer`, with spaces removed for countdown."""
    answer = tasks.extract_answer(completion)
    if answer is not None and tasks.as_example(example)["task"] == "countdown":
        answer = answer.replace(" ", "")
    return answer


def summarize(examples: Sequence[dict], completions_per_problem: Sequence[Sequence[str]],
              ks: Optional[Sequence[int]] = None, reward_cfg: Optional[rewards.RewardConfig] = None) -> dict:
    """Evaluate k completions per example: {"table": scaling_table(...), "problems": [per-problem details]}.

    Correctness of a sample is the GRPO accuracy reward, `rewards.accuracy_reward` (with `reward_cfg`, the run's
    RewardConfig: the same rule the policy was trained on). Votes are `vote_answer`s; for countdown they are grouped
    by exact string equality, for other tasks by `tasks.answers_match`; the majority answer is judged by the same
    reward, as the completion `<answer>{majority}</answer>`.

    Per problem: question, task, reference, answers, correct, n, n_correct, majority, majority_votes, majority_correct
    (the majority over all its samples).
    """
    examples = [tasks.as_example(ex) for ex in examples]
    if len(examples) != len(completions_per_problem):
        raise ValueError(f"completions_per_problem: {len(completions_per_problem)} lists for {len(examples)} examples")
    if not examples:
        raise ValueError("examples: none")
    correct = [[rewards.accuracy_reward(ex, c, cfg=reward_cfg) == 1.0 for c in comps]
               for ex, comps in zip(examples, completions_per_problem)]
    answers = [[vote_answer(ex, c) for c in comps] for ex, comps in zip(examples, completions_per_problem)]
    references = [ex["answer"] for ex in examples]
    countdown = [ex["task"] == "countdown" for ex in examples]

    def judge(i: int, answer: str) -> bool:
        return rewards.accuracy_reward(examples[i], f"<answer>{answer}</answer>", cfg=reward_cfg) == 1.0

    matches = [operator.eq if cd else tasks.answers_match for cd in countdown]
    table = scaling_table(correct, answers, references, ks, match=matches, judge=judge)
    problems = []
    for i, ex in enumerate(examples):
        groups = vote(answers[i], matches[i])
        majority = majority_answer(answers[i], matches[i])
        votes = next((count for rep, count in groups if rep == majority), 0) if majority is not None else 0
        problems.append({
            "question": ex["question"], "task": ex["task"], "reference": references[i],
            "answers": answers[i], "correct": correct[i], "n": len(correct[i]), "n_correct": sum(correct[i]),
            "majority": majority, "majority_votes": votes,
            "majority_correct": majority is not None and judge(i, majority),
            # how the completions work: re-checks (`tasks.rechecked`) and mean length in characters
            "n_rechecked": sum(tasks.rechecked(c) for c in completions_per_problem[i]),
            "mean_chars": float(np.mean([len(c) for c in completions_per_problem[i]])),
        })
    return {"table": table, "problems": problems}


__all__ = ["pass_at_k", "pass1_from_samples", "mean_pass_at_k", "vote", "majority_answer", "cons_at_k", "default_ks",
           "scaling_table", "plot_scaling", "vote_answer", "summarize"]
