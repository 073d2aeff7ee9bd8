"""Verifiable rewards (deepjax/rl/rewards.py): accuracy, format and language consistency on tables of cases, the bounded
safe evaluator, and adversarial completions that must score in bounded time without raising. CPU, no JAX."""

import builtins
import json
import os
import random
import time
from fractions import Fraction

import pytest

from deepjax.rl import rewards

from deepjax.data import tasks
from deepjax.rl.rewards import RewardConfig

ARITH = {"question": "Compute 347 + 86", "answer": "433", "task": "arithmetic",
         "meta": json.dumps({"expression": "347 + 86"})}
ARITH_72 = {"question": "Compute 48 + 24", "answer": "72", "task": "arithmetic",
            "meta": json.dumps({"expression": "48 + 24"})}
COUNTDOWN = {"question": "Using the numbers [3, 7, 25], create an equation that equals 154", "answer": "(25 - 3) * 7",
             "task": "countdown", "meta": json.dumps({"numbers": [3, 7, 25], "target": 154, "steps": []})}
GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Altogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72")
GSM8K = {"question": "How many clips did Natalia sell altogether?", "answer": GSM8K_SOLUTION, "task": "math"}
GSM8K_FINAL = {"question": GSM8K["question"], "answer": "72", "solution": GSM8K_SOLUTION, "task": "math"}  # datasets.py
MATH = {"question": "What is 1/4 + 1/4?", "answer": "We add: $\\frac14+\\frac14=\\boxed{\\frac{1}{2}}$.",
        "task": "math"}
MATH_1024 = {"question": "Compute 2^{10}.", "answer": "1024", "task": "math"}
MATH_SYMBOLIC = {"question": "Compute sin(60°).", "answer": "\\frac{\\sqrt{3}}{2}", "task": "math"}
EXAMPLES = [ARITH, ARITH_72, COUNTDOWN, GSM8K, GSM8K_FINAL, MATH, MATH_1024, MATH_SYMBOLIC]


def wrap(answer: str, think: str = "Let me work it out.") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{fn.__name__} took {elapsed:.2f} s"
    return out


# ============================================================================================================ accuracy

ACCURACY_CASES = [
    # arithmetic: the number, in any exact spelling; never an expression (it would just echo the question)
    (ARITH, wrap("433"), 1.0),
    (ARITH, wrap("433.0"), 1.0),
    (ARITH, "<think>347 + 86</think> \\boxed{433}", 1.0),
    (ARITH, wrap("434"), 0.0),
    (ARITH, wrap("347 + 86"), 0.0),
    (ARITH, "433", 0.0),  # no <answer> and no \boxed{}: nothing extracted
    (ARITH, wrap("433") + " <answer>1</answer>", 0.0),  # the last answer counts
    (ARITH, wrap("−433"), 0.0),
    ({**ARITH, "answer": "-433"}, wrap("−433"), 1.0),  # U+2212 minus sign
    # countdown: each number at most once, exactly the target
    (COUNTDOWN, wrap("(25 - 3) * 7"), 1.0),
    (COUNTDOWN, wrap("7 * (25 - 3)"), 1.0),
    (COUNTDOWN, wrap("(25 - 3) × 7 = 154"), 1.0),
    (COUNTDOWN, wrap("25 * 7 - 3 * 7"), 0.0),  # 7 used twice
    (COUNTDOWN, wrap("22 * 7"), 0.0),  # 22 not given
    (COUNTDOWN, wrap("(25 - 3) * 7 * 1"), 0.0),  # 1 not given
    (COUNTDOWN, wrap("154"), 0.0),
    (COUNTDOWN, wrap("(25 - 3) * 7 + 0"), 0.0),
    (COUNTDOWN, wrap("(25 - 3) ** 7"), 0.0),
    # GSM8K: "#### 72" reference (raw record, or the final answer as datasets.py stores it)
    (GSM8K, wrap("72"), 1.0),
    (GSM8K_FINAL, wrap("72"), 1.0),
    (GSM8K, wrap("72.00"), 1.0),
    (GSM8K, wrap("$72"), 1.0),
    (GSM8K, wrap("\\$72"), 1.0),
    (GSM8K, wrap("\\boxed{72}"), 1.0),
    (GSM8K, wrap("48 + 24"), 1.0),  # math answers compare by value (cfg.math_expressions)
    (GSM8K, wrap("71"), 0.0),
    (GSM8K, wrap("72 clips"), 0.0),
    (GSM8K, "<think>so</think> The answer is 72.", 0.0),  # no last-number fallback by default
    # MATH: \boxed{\frac{1}{2}} reference
    (MATH, wrap("0.5"), 1.0),
    (MATH, wrap("1/2"), 1.0),
    (MATH, wrap("\\frac{1}{2}"), 1.0),
    (MATH, wrap("\\dfrac{2}{4}"), 1.0),
    (MATH, wrap("\\frac12"), 1.0),
    (MATH, "<think>1/4 + 1/4</think> so \\boxed{0.5}", 1.0),
    (MATH, wrap("0.25"), 0.0),
    (MATH, wrap("\\frac{1}{3}"), 0.0),
    (MATH_1024, wrap("2^{10}"), 1.0),
    (MATH_1024, wrap("2**10"), 1.0),
    (MATH_1024, wrap("1,024"), 1.0),
    (MATH_1024, wrap("2^{11}"), 0.0),
    (MATH_SYMBOLIC, wrap("\\frac{\\sqrt{3}}{2}"), 1.0),  # symbolic: normalized string equality only
    (MATH_SYMBOLIC, wrap("\\frac{\\sqrt{3}}{3}"), 0.0),
    # Unicode decimal digits read as their ASCII values, in every task
    (GSM8K, wrap("٧٢"), 1.0),  # Arabic-Indic
    (GSM8K, wrap("７２"), 1.0),  # full-width
    (ARITH_72, wrap("٧٢"), 1.0),
    (ARITH_72, wrap("７２"), 1.0),
    (COUNTDOWN, wrap("(٢٥ - ٣) * ٧"), 1.0),
    (COUNTDOWN, wrap("(２５ - ３) * ７"), 1.0),
    (GSM8K, wrap("٧٣"), 0.0),
    (GSM8K, wrap("7²"), 0.0),  # superscripts are not decimal digits
]


@pytest.mark.parametrize("example, completion, expected", ACCURACY_CASES)
def test_accuracy_table(example, completion, expected):
    assert timed(rewards.accuracy_reward, example, completion) == expected


def test_accuracy_options():
    no_tags = "<think>so</think> The answer is 72."
    assert rewards.accuracy_reward(GSM8K, no_tags, cfg=RewardConfig(last_number_fallback=True)) == 1.0
    assert rewards.accuracy_reward(ARITH_72, no_tags, cfg=RewardConfig(last_number_fallback=True)) == 0.0  # math only
    assert rewards.accuracy_reward(GSM8K, wrap("48 + 24"), cfg=RewardConfig(math_expressions=False)) == 0.0
    assert rewards.accuracy_reward(MATH_1024, wrap("2^{10}"), cfg=RewardConfig(math_expressions=False)) == 0.0
    assert rewards.accuracy_reward(GSM8K, wrap("72").encode()) == 1.0  # bytes are decoded
    assert rewards.accuracy_reward(GSM8K, b"\xff\xfe" + wrap("72").encode()) == 1.0


def test_accuracy_on_generated_tasks():
    for task in tasks.TASKS:
        for ex in tasks.generate(task, 50, seed=1, split="test"):
            assert rewards.accuracy_reward(ex, tasks.sft_completion(ex)) == 1.0
            assert rewards.format_reward(ex, tasks.sft_completion(ex)) == 1.0
            assert rewards.accuracy_reward(ex, wrap("100000")) == 0.0


def test_accuracy_rejects_bad_examples_and_non_strings():
    with pytest.raises(ValueError, match="no accuracy reward"):
        rewards.accuracy_reward({"task": "poetry", "answer": "x"}, wrap("x"))
    with pytest.raises(TypeError):
        rewards.accuracy_reward(GSM8K, None)


def test_extract_answer_matches_tasks_on_random_text():
    """The linear extract_answer gives tasks.extract_answer's result (findall pairing included) on tag soups."""
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "a", " 7 ", "\\boxed{", "}", "{", "<answer", "answer>"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert rewards.extract_answer(text) == tasks.extract_answer(text), text


# =========================================================================================================== evaluate

EVAL_CASES = [
    ("72", 72), ("0.5", Fraction(1, 2)), (".25", Fraction(1, 4)), ("-3", -3), ("1/2", Fraction(1, 2)),
    ("\\frac{1}{2}", Fraction(1, 2)), ("\\dfrac{3}{6}", Fraction(1, 2)), ("\\frac12", Fraction(1, 2)),
    ("\\frac1{4}", Fraction(1, 4)), ("2^{10}", 1024), ("2**10", 1024), ("2^3^2", 512), ("-2^2", -4),
    ("2^-1", Fraction(1, 2)), ("(1+2)*3", 9), ("3 \\times 4", 12), ("3 \\cdot 4", 12), ("12 \\div 4", 3),
    ("8 ÷ 2 × 3", 12), ("[1+1]", 2), ("\\left( 1 + 2 \\right)", 3), ("$5$", 5),
    ("\\boxed{\\frac{1}{2}}", Fraction(1, 2)), ("٧٢", 72), ("(-1)^(10^100)", 1),
    # None: not supported, malformed, or too costly
    ("", None), ("x", None), ("2x", None), ("\\sqrt{4}", None), ("4^{1/2}", None), ("1/0", None),
    ("\\frac{1}{0}", None), ("0^0", None), ("0^{-1}", None), ("(1", None), ("1)", None), ("1 2", None),
    ("9**9**9", None), ("10**10**10", None), ("2^{2^{2^{2^{2}}}}", None), ("10^{5000}", None),
    ("1e999999999", None), ("__import__('os')", None),
    ("(" * 500 + "1" + ")" * 500, None), ("-" * 500 + "1", None), ("1" * 1001, None), ("1,000", None),
]


@pytest.mark.parametrize("text, expected", EVAL_CASES)
def test_evaluate_table(text, expected):
    assert timed(rewards.evaluate, text) == expected


def test_evaluate_bounds_values():
    assert rewards.evaluate("10^{999}") == 10**999  # at the cap
    assert rewards.evaluate("10^{999} * 10^{999}") is None  # over it
    assert rewards.evaluate("(10^{500})^{10}") is None
    assert rewards.evaluate("1/3^{2200}") is None  # 3487 bits
    assert timed(rewards.evaluate, "2^2^" * 150 + "2") is None  # 600 characters of towers, refused level by level
    assert timed(rewards.evaluate, "+".join(["9^{900}"] * 100)) is not None  # 100 big powers: fine, still fast


# ============================================================================================================= format

FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>347 + 86 = 433</think> <answer>433</answer>", 1.0),
    ("\n <think>\nlong\nreasoning\n</think>\n\n<answer>\n42\n</answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("", 0.0),
    ("<answer>42</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<think>a</think> 42", 0.0),
    ("<answer>42</answer><think>a</think>", 0.0),
    ("intro <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer> outro", 0.0),
    ("<think>a</think> between <answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    ("<think>a</think><think>b</think><answer>c</answer>", 0.0),
    ("<think><think>a</think></think><answer>b</answer>", 0.0),
    ("<think>a<answer>x</answer></think><answer>b</answer>", 0.0),  # tasks.format_ok alone accepts this one
    ("<think>a</think><answer>b<think>c</answer>", 0.0),
    ("<think>a</think><answer>b", 0.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format_table(completion, expected):
    assert timed(rewards.format_reward, GSM8K, completion) == expected


def test_tasks_format_ok_agrees_with_the_format_reward():
    assert not tasks.format_ok("<think>a<answer>x</answer></think><answer>b</answer>")  # tags appear once only
    for completion, expected in FORMAT_CASES:
        if expected == 1.0:
            assert tasks.format_ok(completion)


# ================================================================================================= language consistency

LANGUAGE_CASES = [
    ("<think>Let me compute this carefully.</think><answer>1</answer>", "en", 1.0),
    ("<think>Let me check 这个</think><answer>1</answer>", "en", 3 / 5),  # each Han character is a word
    ("<think>我们来计算</think><answer>1</answer>", "en", 0.0),
    ("<think>First, 48 / 2 = 24. 所以 the total is 72.</think>", "en", 4 / 6),
    ("<think>我们 compute 一下</think>", "zh", 4 / 5),
    ("<think>我们来计算</think>", "zh", 1.0),
    ("<think>ひらがな 漢字</think>", "zh", 2 / 6),  # kana count against zh
    ("<think>Le café est naïf</think>", "en", 2 / 4),
    ("<think>Le café est naïf</think>", "latin", 1.0),
    ("<think>Let α be 2</think>", "en", 2 / 3),  # Greek letters count against English
    ("<think>x_1 + x2 = \\frac{a}{b}</think>", "en", 1.0),  # words: x, x, frac, a, b
    ("<think></think><answer>72</answer>", "en", 0.0),  # empty reasoning
    ("<think>347 + 86 = 433</think><answer>433</answer>", "en", 0.0),  # no words
    ("<answer>plain English answer</answer>", "en", 0.0),  # no reasoning part
    ("<think>unclosed reasoning, cut off", "en", 1.0),
    ("reasoning after a prompt ending in think 推理</think><answer>1</answer>", "en", 7 / 9),
    ("<think>one two</think><think>三四</think>", "en", 1.0),  # only the first think block
]


@pytest.mark.parametrize("completion, language, expected", LANGUAGE_CASES)
def test_language_table(completion, language, expected):
    cfg = RewardConfig(target_language=language)
    assert timed(rewards.language_consistency_reward, GSM8K, completion, cfg=cfg) == pytest.approx(expected)


# ============================================================================================================ combined


def test_combined_and_config():
    completion = "<think>Let me check 这个</think> <answer>72</answer>"
    out = rewards.combined(GSM8K, completion)
    assert out == pytest.approx({"accuracy": 1.0, "format": 1.0, "language": 0.6, "total": 1.1})  # R1-Zero defaults
    assert rewards.combined(GSM8K, completion, rewards.R1) == pytest.approx({**out, "total": 1.6})
    cfg = RewardConfig(accuracy=2.0, format=0.5, language=0.25)
    assert rewards.combined(GSM8K, completion, cfg)["total"] == pytest.approx(2.0 + 0.5 + 0.25 * 0.6)
    assert rewards.combined(GSM8K, "garbage") == {"accuracy": 0.0, "format": 0.0, "language": 0.0, "total": 0.0}
    assert rewards.DEFAULT == rewards.R1_ZERO and rewards.R1_ZERO.language == 0.0
    for bad in ({"accuracy": -1.0}, {"format": float("nan")}, {"target_language": "klingon"}, {"max_chars": 0}):
        with pytest.raises(ValueError):
            RewardConfig(**bad)


def test_over_long_completions_score_zero_unread():
    good = wrap("72", think="Let me think. " * 5000)  # ~70k characters
    assert len(good) > rewards.MAX_COMPLETION_CHARS
    assert rewards.combined(GSM8K, good)["total"] == 0.0
    big = RewardConfig(max_chars=len(good))
    assert rewards.combined(GSM8K, good, big) == pytest.approx({"accuracy": 1.0, "format": 1.0, "language": 1.0,
                                                                 "total": 1.1})


# ========================================================================================================= adversarial

CAP = rewards.MAX_COMPLETION_CHARS
N = 100_000
ADVERSARIAL = {
    "1 MB of text": "x" * 2**20,
    "1 MB answer": "<answer>" + "9" * 2**20 + "</answer>",
    "answer at the length cap": "<answer>" + "9" * (CAP - 17) + "</answer>",
    "5000-digit answer": wrap("1" * 5000),  # tasks.to_number raises on > 4300 digits
    "999-digit answer": wrap("1" * 999),
    "long decimal": wrap("0." + "1" * 998),
    "9**9**9": wrap("9**9**9"),
    "10**10**10": wrap("10**10**10"),
    "9^9^9 tower": wrap("9^{9^{9^{9}}}"),
    "power chain": wrap("2^" * 400 + "2"),
    "huge exponent literal": wrap("1e999999999"),
    "100k nested parentheses": "<answer>" + "(" * N + "1" + ")" * N + "</answer>",
    "30k nested parentheses": "<answer>" + "(" * 30_000 + "1" + ")" * 30_000 + "</answer>",
    "199 nested parentheses": wrap("(" * 99 + "25" + ")" * 99),
    "deep unary": wrap("-" * 199 + "7"),
    "os.system": wrap("__import__('os').system('echo hi')"),
    "subclasses": wrap("().__class__.__bases__[0].__subclasses__()"),
    "lambda": wrap("(lambda: 1)()"),
    "arabic-indic digits": wrap("٧٢"),
    "full-width digits": wrap("７２"),
    "lone surrogates": "<think>\ud800 \udfff word</think><answer>\ud83d72</answer>",
    "NUL bytes": "<think>\x00a\x00</think><answer>7\x002</answer>",
    "NULs everywhere": "\x00" * 60_000,
    "100k answer tags": "<answer>" * N,
    "answer tags at the cap": "<answer>" * (CAP // 8),  # quadratic (seconds) for tasks.extract_answer
    "100k closed answers": "<answer>1</answer>" * N,
    "answer soup at the cap": ("<answer><answer></answer></answer>" * (CAP // 35)),
    "boxed soup": "\\boxed{" * (CAP // 8),
    "frac soup": wrap("\\frac{" * 100),
    "frac soup at the cap": "\\boxed{" + "\\frac{1}{" * (CAP // 10) + "}",
    "braces": "{" * (CAP - 1),
    "think tags": "<think>" * (CAP // 8),
    "think soup": "</think><think>" * (CAP // 16),
    "format near miss": "<think>" + "a" * (CAP - 40) + "</think><answer>1",
    "whitespace": " \n\t" * (CAP // 3),
    "numbers at the cap": "1," * (CAP // 2),
    "cjk at the cap": "<think>" + "我" * (CAP - 8),
    "mixed scripts": "<think>" + "aé我α1_" * (CAP // 7),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completions_score_in_bounded_time(name, monkeypatch, capfd):
    completion = ADVERSARIAL[name]

    def forbidden(*args, **kwargs):
        raise AssertionError("eval / exec / os.system called on model output")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    configs = [rewards.DEFAULT, RewardConfig(last_number_fallback=True, language=1.0),
               RewardConfig(max_chars=4 * 2**20, last_number_fallback=True)]  # past the cap: the scans stay linear
    for example in EXAMPLES:
        for cfg in configs:
            out = timed(rewards.combined, example, completion, cfg)
            assert set(out) == {"accuracy", "format", "language", "total"}
            assert all(0.0 <= out[k] <= 1.0 for k in ("accuracy", "format", "language")), out
    assert "hi" not in capfd.readouterr().out


def test_adversarial_values():
    """Decisions on the adversarial table: what scores what."""
    score = lambda name, example=GSM8K: rewards.accuracy_reward(example, ADVERSARIAL[name])  # noqa: E731
    assert score("arabic-indic digits") == score("full-width digits") == 1.0
    assert score("NUL bytes") == 0.0 and score("lone surrogates") == 0.0
    assert score("10**10**10") == score("9**9**9") == 0.0
    assert score("199 nested parentheses", COUNTDOWN) == 0.0  # Python's parser refuses > 200 nesting: caught
    assert score("5000-digit answer") == 0.0  # over MAX_ANSWER_CHARS, before tasks.to_number can raise
    assert rewards.accuracy_reward({**GSM8K, "answer": "1" * 999}, ADVERSARIAL["999-digit answer"]) == 1.0
    assert rewards.accuracy_reward(GSM8K, "<answer>1</answer>" * 10 + "<answer>72</answer>") == 1.0
    big = RewardConfig(max_chars=4 * 2**20)
    assert rewards.accuracy_reward(ARITH, "<answer>433</answer>" * N, cfg=big) == 1.0
    # the only word is "word": surrogates are not letters
    assert rewards.language_consistency_reward(GSM8K, ADVERSARIAL["lone surrogates"]) == 1.0
