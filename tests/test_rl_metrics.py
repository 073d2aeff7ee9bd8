"""Evaluation metrics (deepjax/rl/metrics.py): unbiased pass@k, R1 pass@1, cons@k majority vote, scaling table, plot,
summarize. Pure Python, no JAX."""
import itertools
import json
import math
import operator
import random
import re
import subprocess
import sys

import pytest

from deepjax.rl import metrics as ev
from deepjax.data import tasks


# ================================================================================================ pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert ev.pass_at_k(10, 0, 1) == 0.0 and ev.pass_at_k(10, 0, 10) == 0.0
    assert ev.pass_at_k(10, 10, 1) == 1.0 and ev.pass_at_k(10, 10, 10) == 1.0
    assert ev.pass_at_k(10, 1, 10) == 1.0  # k = n: every sample is drawn
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert ev.pass_at_k(10, 7, 4) == 1.0  # n - c < k
    assert isinstance(ev.pass_at_k(5, 2, 2), float)
    # large n: no overflow, and agrees with the exact ratio of big integers
    n, c, k = 1000, 13, 64
    assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    import numpy as np
    assert ev.pass_at_k(np.int64(8), np.int64(2), np.int64(3)) == pytest.approx(brute_pass_at_k(8, 2, 3))


def test_pass_at_k_monotone_in_k():
    for n, c in [(16, 1), (16, 5), (64, 3), (7, 6)]:
        values = [ev.pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))
        assert values[0] == pytest.approx(c / n)


@pytest.mark.parametrize("args, name", [((3, 1, 4), "k"), ((3, 4, 1), "c"), ((-1, 0, 1), "n"), ((3, -1, 1), "c"),
                                        ((3, 1, -2), "k"), ((3, 1, 0), "k"), ((0, 0, 1), "n"), ((3, 1, 1.5), "k")])
def test_pass_at_k_errors_name_the_argument(args, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        ev.pass_at_k(*args)


def test_pass1_is_mean_accuracy():
    correct = [[True, False, False, True], [False] * 4, [True] * 4]
    assert ev.pass1_from_samples(correct) == pytest.approx((2 / 4 + 0 + 1) / 3)
    # equal sample counts: pass@1 = overall accuracy = mean pass_at_k(., ., 1)
    flat = [x for row in correct for x in row]
    assert ev.pass1_from_samples(correct) == pytest.approx(sum(flat) / len(flat))
    assert ev.pass1_from_samples(correct) == pytest.approx(ev.mean_pass_at_k(correct, 1))
    # unequal counts: per-problem mean first
    assert ev.pass1_from_samples([[True], [True, False, False, False]]) == pytest.approx((1 + 0.25) / 2)
    with pytest.raises(ValueError, match="correct"):
        ev.pass1_from_samples([])
    with pytest.raises(ValueError, match="correct"):
        ev.pass1_from_samples([[True], []])


# ================================================================================================ cons@k


def test_majority_answer_basic_none_and_ties():
    assert ev.majority_answer(["3", "4", "4"]) == "4"
    assert ev.majority_answer([None, None]) is None
    assert ev.majority_answer([]) is None
    assert ev.majority_answer([None, "7", None, None]) == "7"  # None never votes
    # ties: the group whose first member comes first wins
    assert ev.majority_answer(["5", "6", "6", "5"]) == "5"
    assert ev.majority_answer(["6", "5", "5", "6"]) == "6"
    assert ev.majority_answer([None, "b", "a"], match=operator.eq) == "b"


def test_majority_answer_groups_equivalent_answers():
    # "0.5", "1/2" and "\frac{1}{2}" vote together (3) against "2" (2); the winner is the group's first member
    answers = ["2", "0.5", "2", "1/2", "\\frac{1}{2}"]
    assert ev.majority_answer(answers) == "0.5"
    assert ev.vote(answers) == [("2", 2), ("0.5", 3)]
    # with plain string equality they would not: "2" wins
    assert ev.majority_answer(answers, match=operator.eq) == "2"
    assert ev.majority_answer(["1,000", "1000", "999"]) == "1,000"
    assert ev.majority_answer(["", "", "x"]) == ""  # identical strings always group (answers_match rejects "")


def test_cons_at_k():
    answers = [
        ["1", "2", "2", "1", "1"],  # ref "1": majority over 3 is "2", over 5 is "1"
        [None, "1/2", "0.5", "3", None],  # ref "0.5": equivalent answers grouped -> right for k >= 3
        [None, None, None, None, None],  # never answers -> never right
        ["9", "8", "8", "9", "8"],  # ref "9": k=1 "9" (right), k=2 tie -> "9" (earliest), k=3 "8", k=4 tie -> "9"
    ]
    refs = ["1", "0.5", "7", "9"]
    assert ev.cons_at_k(answers, refs, 1) == pytest.approx(2 / 4)  # "1"; None; None; "9"
    assert ev.cons_at_k(answers, refs, 2) == pytest.approx(3 / 4)  # "1" (tie, earliest); "1/2"; -; "9" (tie)
    assert ev.cons_at_k(answers, refs, 3) == pytest.approx(1 / 4)  # "2"; "1/2"; -; "8"
    assert ev.cons_at_k(answers, refs, 4) == pytest.approx(3 / 4)  # "1" (tie); "1/2"; -; "9" (tie)
    assert ev.cons_at_k(answers, refs, 5) == pytest.approx(2 / 4)  # "1"; "1/2"; -; "8"
    # only the first k answers count: extra samples after k change nothing
    longer = [row + ["junk"] * 10 for row in answers]
    for k in range(1, 6):
        assert ev.cons_at_k(longer, refs, k) == ev.cons_at_k(answers, refs, k)
    # judge overrides the reference check
    assert ev.cons_at_k(answers, refs, 5, judge=lambda i, a: a == "8") == pytest.approx(1 / 4)
    # per-problem match functions
    assert ev.cons_at_k([["1/2", "0.5", "3", "3"]], ["0.5"], 4, match=[operator.eq]) == 0.0
    assert ev.cons_at_k([["1/2", "0.5", "3", "3"]], ["0.5"], 4, match=[tasks.answers_match]) == 1.0
    with pytest.raises(ValueError, match="^k="):
        ev.cons_at_k(answers, refs, 6)
    with pytest.raises(ValueError, match="^references"):
        ev.cons_at_k(answers, refs[:2], 1)


# ================================================================================================ scaling table


def test_default_ks():
    assert ev.default_ks(1) == (1,)
    assert ev.default_ks(8) == (1, 2, 4, 8)
    assert ev.default_ks(6) == (1, 2, 4, 6)


def test_scaling_table_small_case():
    # problem 0: 1 of 4 right, answers "3" (right) + three different wrong ones
    # problem 1: 2 of 4 right, two "5" (right) against one "6" and one None
    correct = [[False, True, False, False], [True, False, True, False]]
    answers = [["1", "3", "2", "4"], ["5", "6", "5", None]]
    refs = ["3", "5"]
    table = ev.scaling_table(correct, answers, refs)
    assert [row["k"] for row in table] == [1, 2, 4]
    expect_pass = {1: (1 / 4 + 2 / 4) / 2, 2: ((1 - 3 / 6) + (1 - 1 / 6)) / 2, 4: 1.0}
    expect_cons = {1: (0 + 1) / 2, 2: (0 + 1) / 2, 4: (0 + 1) / 2}  # problem 0: "1" always wins the tie
    expect_pass1 = {1: (0 + 1) / 2, 2: (1 / 2 + 1 / 2) / 2, 4: (1 / 4 + 2 / 4) / 2}
    for row in table:
        k = row["k"]
        assert set(row) == {"k", "pass@k", "cons@k", "pass@1"}
        assert row["pass@k"] == pytest.approx(expect_pass[k])
        assert row["cons@k"] == pytest.approx(expect_cons[k])
        assert row["pass@1"] == pytest.approx(expect_pass1[k])
    assert ev.scaling_table(correct, answers, refs, ks=[4, 2])[0]["k"] == 4
    with pytest.raises(ValueError, match="^k="):
        ev.scaling_table(correct, answers, refs, ks=[8])
    with pytest.raises(ValueError, match="^answers"):
        ev.scaling_table(correct, [row[:3] for row in answers], refs)


def test_plot_scaling_writes_png(tmp_path):
    table = ev.scaling_table([[True, False] * 4, [False] * 7 + [True]], [["1", "2"] * 4, ["x"] * 7 + ["y"]],
                             ["1", "y"])
    path = tmp_path / "scaling.png"
    assert ev.plot_scaling(table, path) == str(path)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_importable_without_jax():
    code = ("import sys; import deepjax.rl.metrics; "
            "assert not {'jax', 'grain', 'tensorflow_datasets', 'matplotlib'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ================================================================================================ summarize


def _done(answer: str, think: str = "...") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


def test_summarize_arithmetic():
    examples = tasks.generate("arithmetic", 3, seed=0, split="test")
    refs = [ex["answer"] for ex in examples]
    wrong = [str(int(r) + 1) for r in refs]
    completions = [
        [_done(refs[0])] * 4,  # always right
        [_done(wrong[1]), "no answer", _done(refs[1]), f"so \\boxed{{{wrong[1]}}}"],  # 1 of 4, majority wrong
        [_done(wrong[2]), _done(refs[2]), _done(f"{refs[2]}.0"), "<answer>???</answer>"],  # 2 of 4, majority right
    ]
    out = ev.summarize(examples, completions)
    problems, table = out["problems"], out["table"]
    assert [p["n_correct"] for p in problems] == [4, 1, 2]
    assert problems[1]["correct"] == [False, False, True, False]
    assert problems[1]["answers"] == [wrong[1], None, refs[1], wrong[1]]
    assert problems[1]["majority"] == wrong[1] and problems[1]["majority_votes"] == 2
    assert not problems[1]["majority_correct"]
    assert problems[2]["majority"] == refs[2] and problems[2]["majority_votes"] == 2  # "x" and "x.0" vote together
    assert problems[2]["majority_correct"]
    assert [p["question"] for p in problems] == [ex["question"] for ex in examples]
    assert [row["k"] for row in table] == [1, 2, 4]
    by_k = {row["k"]: row for row in table}
    assert by_k[4]["pass@1"] == pytest.approx((1 + 1 / 4 + 2 / 4) / 3)
    assert by_k[1]["cons@k"] == pytest.approx(1 / 3)  # first answers: right, wrong, wrong
    assert by_k[4]["cons@k"] == pytest.approx(2 / 3)
    assert by_k[4]["pass@k"] == 1.0
    assert by_k[2]["pass@k"] == pytest.approx((1 + 1 / 2 + (1 - 1 / 6)) / 3)
    # deterministic and JSON-serializable
    assert ev.summarize(examples, completions) == out
    json.dumps(out)
    assert [row["k"] for row in ev.summarize(examples, completions, ks=[1, 3])["table"]] == [1, 3]


def test_summarize_countdown_votes_on_space_free_expressions():
    example = tasks.generate("countdown", 1, seed=0, split="test")[0]
    meta = tasks.example_meta(example)
    ref = example["answer"]
    squeezed = ref.replace(" ", "")
    bad = f"{meta['numbers'][0]} + {meta['numbers'][0]} + {meta['numbers'][0]}"  # a number used three times
    spaced = "  ".join(re.findall(r"\d+|\S", squeezed))  # same expression, other spacing
    completions = [[_done(bad), _done(bad), _done(ref), _done(squeezed), _done(spaced)]]
    out = ev.summarize([example], completions)
    p = out["problems"][0]
    assert p["correct"] == [False, False, True, True, True]
    assert p["majority"] == squeezed and p["majority_votes"] == 3 and p["majority_correct"]
    by_k = {row["k"]: row for row in out["table"]}
    assert by_k[2]["cons@k"] == 0.0 and by_k[4]["cons@k"] == 0.0  # k=4: 2 vs 2, the invalid one came first
    assert by_k[5]["cons@k"] == 1.0
    # a mix of tasks: each problem uses its own grouping and judge
    arith = tasks.generate("arithmetic", 1, seed=1, split="test")[0]
    mixed = ev.summarize([example, arith], completions + [[_done(arith["answer"])] * 5])
    assert {row["k"]: row["cons@k"] for row in mixed["table"]}[5] == 1.0


# ---- one rule for evaluation and reward ------------------------------------------------------------------------

MATH = {"task": "math", "question": "2 to the tenth?", "answer": "1024"}
ARITH = {"task": "arithmetic", "question": "2 - 7", "answer": "-5", "meta": {"expression": "2 - 7"}}
HALF = {"task": "math", "question": "half?", "answer": "\\frac{1}{2}"}
VERDICTS = [  # (example, completion, right?): answer forms the two rules once judged differently, and neighbours
    (MATH, "<think>.</think> <answer>2^{10}</answer>", True),  # a LaTeX power
    (MATH, "<answer>1,024</answer>", True),  # thousands separator
    (MATH, "so the answer is \\boxed{1024}.", True),
    (MATH, "<answer>1024 \\text{ apples}</answer>", True),  # trailing unit
    (MATH, "<answer>１０２４</answer>", True),  # full-width digits
    (MATH, "<answer>1025</answer>", False),
    (MATH, "<answer>2^{11}</answer>", False),
    (ARITH, "<answer>\u22125</answer>", True),  # U+2212 MINUS SIGN
    (ARITH, "<answer>-5</answer>", True),
    (ARITH, "<answer>٥</answer>", False),  # Arabic-Indic 5: positive
    (ARITH, "<answer>2 - 7</answer>", False),  # the question echoed is not evaluated
    (HALF, "<answer>0.5</answer>", True),
    (HALF, "<answer>\\frac{3}{6}</answer>", True),
    (HALF, "<answer>2/4</answer>", True),
    (HALF, "<answer>0.25</answer>", False),
]


@pytest.mark.parametrize("example, completion, right", VERDICTS)
def test_eval_and_reward_give_one_verdict(example, completion, right):
    from deepjax.rl import rewards

    summary = ev.summarize([example], [[completion]])["problems"][0]
    assert summary["correct"] == [right]
    assert (rewards.accuracy_reward(example, completion) == 1.0) is right
    assert summary["majority_correct"] is right  # the majority vote judged by the same rule


def test_eval_and_reward_agree_on_fuzzed_completions():
    """Random completions around right and wrong answer forms: the eval verdict is the reward's, every time."""
    from deepjax.rl import rewards

    rng = random.Random(0)
    noise = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "}", " ", "x", "١", "(", ")", "*", "/", "-",
             "\u2212", ",", "\\text{ m}"]
    forms = {id(MATH): ["1024", "2^{10}", "1,024", "1025"], id(ARITH): ["-5", "\u22125", "5", "2 - 7"],
             id(HALF): ["0.5", "\\frac{1}{2}", "2/4", "0.4"]}
    for ex in (MATH, ARITH, HALF):
        comps = []
        for _ in range(300):
            mid = f"<answer>{rng.choice(forms[id(ex)])}</answer>" if rng.random() < 0.6 else ""
            comps.append("".join(rng.choices(noise, k=rng.randint(0, 6))) + mid
                         + "".join(rng.choices(noise, k=rng.randint(0, 3))))
        summary = ev.summarize([ex], [comps])["problems"][0]
        assert summary["correct"] == [rewards.accuracy_reward(ex, c) == 1.0 for c in comps]
        assert 0 < sum(summary["correct"]) < len(comps)  # both verdicts occur
