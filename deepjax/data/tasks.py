"""Verifiable reasoning tasks and their rule-based checkers (the R1 accuracy and format rewards).

Pure Python (standard library only): the RL code on the accelerator machine imports this module, where grain, tfds and tokenizers
may be missing.

Tasks (generated deterministically from a seed, `generate(task, n, seed, split)`):

    arithmetic  "Compute 347 + 86"                         answer "433"
    countdown   "Using the numbers [3, 7, 25], ... make 154"   answer "(25 - 3) * 7"  (any valid expression is accepted)

An example is a flat dict of TFDS-friendly values:

    {"question": str, "answer": str (the reference), "task": str, "meta": str (JSON, what the verifier needs)}

    meta, arithmetic: {"expression": "347 + 86"}
    meta, countdown:  {"numbers": [3, 7, 25], "target": 154, "steps": ["25 - 3 = 22", "22 * 7 = 154"]}

`jsonl_math` examples (deepjax/data/datasets.py) have task "math" and a `solution` field instead of `meta`.

Train and test never share a question, whatever n and seed: each question belongs to one split by a hash of its text
(`_split_of`), and each split's generator keeps only its own questions.

Checkers (R1, docs/deepseek.md, R1: "rule-based rewards only"):

    extract_answer(text)         last <answer>...</answer>, else the last \\boxed{...}
    format_ok(completion)        the format reward: "<think> ... </think> <answer> ... </answer>"
    (The accuracy reward, which `deepjax eval` scores with too, is deepjax/rl/rewards.py's `accuracy_reward`: one rule
    for training and evaluation.)
    sft_completion(example)      a short worked completion in that format, for SFT of the tiny model
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import random
import re
from fractions import Fraction
from typing import Optional

from deepjax.errors import ConfigError

TASKS = ("arithmetic", "countdown")
SPLITS = ("train", "test")
TEST_SHARE = 1 / 8  # share of the question space reserved for the test split (by hash)
MAX_NUMBER_CHARS = 1000  # longer numeric answers are not numbers to the checkers (bounds their work)
MAX_EXPRESSION_CHARS = 200  # longer countdown answers are rejected before parsing (bounds the work of a reward)
MAX_COMPLETION_CHARS = 64 * 1024  # longer completions are not read by extract_answer (as by the rewards: 0.0 unread)


# ---------------------------------------------------------------------------------------------------------- examples


def as_example(record: dict) -> dict:
    """A record as stored (TFDS gives bytes and numpy scalars) as plain str / int values."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        out[key] = value
    return out


def example_meta(example: dict) -> dict:
    """The task-specific fields: the JSON `meta` string parsed, merged with any top-level numbers/target."""
    example = as_example(example)
    meta = json.loads(example["meta"]) if example.get("meta") else {}
    for key in ("numbers", "target", "expression"):
        if key in example:
            meta[key] = example[key]
    return meta


def _make(task: str, question: str, answer: str, **meta) -> dict:
    return {"question": question, "answer": answer, "task": task, "meta": json.dumps(meta, sort_keys=True)}


# -------------------------------------------------------------------------------------------------------- generation


DEFAULT_OPTIONS = {"max_digits": 4, "ops": "+-*", "terms": 2}  # arithmetic: operand digits, operators, operands
OPS = "+-*"
MAX_TERMS = 5


def check_options(task: str, max_digits: int, ops: str, terms: int = 2) -> None:
    """Errors name the field (data.max_digits / data.ops / data.terms) and the value."""
    if not (isinstance(max_digits, int) and 1 <= max_digits <= 9):
        raise ConfigError(f"data.max_digits={max_digits!r}: must be an integer in [1, 9]")
    if not ops or any(c not in OPS for c in ops) or len(set(ops)) != len(ops):
        raise ConfigError(f"data.ops={ops!r}: must be distinct operators from {OPS!r}")
    if not (isinstance(terms, int) and 2 <= terms <= MAX_TERMS):
        raise ConfigError(f"data.terms={terms!r}: must be an integer in [2, {MAX_TERMS}]")
    if terms > 2 and "*" in ops:
        raise ConfigError(f"data.terms={terms}: chains of more than two operands take + and - only (data.ops={ops!r})")


def options_of(data_cfg) -> dict:
    """The task options of a DataConfig (what `generate` takes besides task, n, seed and split)."""
    return {k: getattr(data_cfg, k, v) for k, v in DEFAULT_OPTIONS.items()}


def _arithmetic(rng: random.Random, max_digits: int = 4, ops: str = "+-*", terms: int = 2) -> dict:
    """`a op b`: + and - on operands of 1..max_digits digits (the digit count drawn first), * on 2-3 digits times
    1-2 digits (capped at max_digits). The defaults (4, "+-*", 2) are the original task, draw for draw.
    terms > 2: a chain `a op b op c ...` of + and -, worked left to right (meta `steps`: "a op b = r", ...)."""
    if terms > 2:
        nums = [rng.randint(0, 10 ** rng.randint(1, max_digits) - 1) for _ in range(terms)]
        chain_ops = [rng.choice(ops) for _ in range(terms - 1)]
        expression = " ".join([str(nums[0])] + [f"{o} {n}" for o, n in zip(chain_ops, nums[1:])])
        steps, value = chain_steps(nums, chain_ops)
        return _make("arithmetic", f"Compute {expression}", str(value), expression=expression, steps=steps)
    op = rng.choice(ops)
    if op == "*":  # 2-3 digits times 1-2 digits: hard for a tiny model, checkable by hand
        a, b = rng.randint(10 if max_digits > 1 else 2, 10 ** min(3, max_digits) - 1), \
            rng.randint(2, 10 ** min(2, max_digits) - 1)
    else:
        a, b = (rng.randint(0, 10 ** rng.randint(1, max_digits) - 1) for _ in range(2))
    expression = f"{a} {op} {b}"
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return _make("arithmetic", f"Compute {expression}", str(value), expression=expression)


def chain_steps(nums: list, ops: list, slip: int = 0, slip_at: int = 0) -> tuple[list, int]:
    """The left-to-right steps of `nums[0] ops[0] nums[1] ...` as ["a op b = r", ...] and the final value; with
    `slip` != 0 the result of step `slip_at` is off by `slip` and the later steps carry the wrong value on."""
    value, steps = nums[0], []
    for i, (op, n) in enumerate(zip(ops, nums[1:])):
        new = value + n if op == "+" else value - n
        if slip and i == slip_at:
            new += slip
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    return steps, value


def _chain_of(expression: str) -> tuple[list, list]:
    """'3 + 5 - 2' -> ([3, 5, 2], ['+', '-'])."""
    toks = expression.split()
    return [int(t) for t in toks[0::2]], toks[1::2]


def _countdown(rng: random.Random, **_) -> dict:
    """3-4 numbers; the target is the value of a random expression over a subset of them (so always solvable)."""
    while True:
        numbers = [rng.randint(1, 50) for _ in range(rng.randint(3, 4))]
        pool = [(str(x), x) for x in rng.sample(numbers, rng.randint(2, len(numbers)))]  # (text, value)
        steps = []
        while len(pool) > 1:
            (ta, a), (tb, b) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            if a < b:  # keep every intermediate value positive
                (ta, a), (tb, b) = (tb, b), (ta, a)
            ops = ["+", "-", "*"] + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            steps.append(f"{a} {op} {b} = {value}")
            wrap = lambda t: t if t.isdigit() else f"({t})"  # noqa: E731
            pool.append((f"{wrap(ta)} {op} {wrap(tb)}", value))
        expression, target = pool[0]
        if 1 <= target <= 999 and target not in numbers:
            break
    question = (f"Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, *, / and "
                f"parentheses, and each number at most once")
    return _make("countdown", question, expression, numbers=numbers, target=target, steps=steps)


GENERATORS = {"arithmetic": _arithmetic, "countdown": _countdown}


def _split_of(question: str) -> str:
    """Which split a question belongs to: a stable hash of its text (never Python's salted hash())."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "little")
    return "test" if h < TEST_SHARE * 2**64 else "train"


def generate(task: str, n: int, seed: int, split: str, max_digits: int = 4, ops: str = "+-*",
             terms: int = 2) -> list[dict]:
    """`n` distinct examples of `task` for `split`, a pure function of (task, n, seed, split, options).
    Options (arithmetic only; countdown ignores them): `max_digits` per operand, `ops` the operators drawn from,
    `terms` the operands per question (a chain of + and - worked step by step when more than 2).

    The first k examples of generate(..., n) are those of generate(..., k) for k < n. Train and test are disjoint for
    any sizes and seeds (see `_split_of`).
    """
    if task not in GENERATORS:
        raise ValueError(f"task={task!r}: unknown; choose from {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: unknown; choose from {SPLITS}")
    check_options(task, max_digits, ops, terms)
    rng = random.Random(f"deepjax/{task}/{split}/{seed}")  # str seeds hash with SHA-512: stable across runs
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ConfigError(f"task={task!r}: could not draw {n} distinct {split} examples (question space too "
                              f"small): lower data.num_{split}, or widen the task (data.max_digits, data.ops)")
        ex = GENERATORS[task](rng, max_digits=max_digits, ops=ops, terms=terms)
        if ex["question"] not in seen and _split_of(ex["question"]) == split:
            seen.add(ex["question"])
            out.append(ex)
    return out


def sft_completion(example: dict, freeform: bool = False, slip: int = 0, slip_at: int = 0,
                   recheck: bool = False) -> str:
    """A short worked completion in R1 format: `<think>347 + 86 = 433</think> <answer>433</answer>`, or with
    `freeform` the same reasoning with the answer in words and no tags: `<think>...</think> The answer is 433.`
    (which the checkers do not accept: see data.freeform_share).

    Arithmetic only (data.slip_share, data.recheck_share: the imperfect base of `deepjax r1zero`):
      slip     a step's result off by `slip` (step `slip_at`), carried on to a wrong final answer, as a base that
               computes carelessly;
      recheck  the worked chain is checked by undoing it from the result ("check 6 + 2 = 8, 8 - 5 = 3, ok"); a
               check that does not give back the first operand says so and works the chain again, correctly
               ("..., not 3. again 3 + 5 = 8, 8 - 2 = 6"): the answer after a re-check is the right one.

    Generated tasks show their computation; `math` examples (jsonl_math) put the solution text (without GSM8K's
    `#### N` line) in <think> and the final answer in <answer>; a `traces` record (with a `completion` field) is
    trained on its completion as it is (freeform, slips and re-checks do not apply).
    """
    example = as_example(example)
    if "completion" in example:  # a `traces` record (deepjax distill): the completion itself, verbatim
        return example["completion"]
    task, answer = example["task"], example["answer"]
    if task == "arithmetic" and "*" in example_meta(example)["expression"]:
        think = f"{example_meta(example)['expression']} = {answer}"  # slips and re-checks: + and - only
    elif task == "arithmetic":
        nums, ops = _chain_of(example_meta(example)["expression"])
        steps, value = chain_steps(nums, ops, slip, slip_at % len(ops))
        think = ", ".join(steps)
        if recheck:
            undo, x = [], value
            for op, n in zip(reversed(ops), reversed(nums[1:])):
                inv = "-" if op == "+" else "+"
                y = x - n if op == "+" else x + n
                undo.append(f"{x} {inv} {n} = {y}")
                x = y
            think += ". check " + ", ".join(undo)
            if x == nums[0]:
                think += ", ok"
            else:
                steps, value = chain_steps(nums, ops)
                think += f", not {nums[0]}. again " + ", ".join(steps)
        answer = str(value)
    elif task == "countdown":
        think = ", ".join(example_meta(example)["steps"])
    elif task == "math":
        think = re.sub(r"\n?####.*$", "", example.get("solution", ""), flags=re.DOTALL).strip()
    else:
        raise ValueError(f"task={task!r}: no SFT completion defined")
    if freeform:
        return f"<think>{think}</think> The answer is {answer}."
    return f"<think>{think}</think> <answer>{answer}</answer>"


def rechecked(completion: str) -> bool:
    """Whether a completion re-checks its work (the marker `deepjax r1zero` follows over training)."""
    return "check" in completion


# ---------------------------------------------------------------------------------------------------------- checkers

_FORMAT_RE = re.compile(r"\s*<think>((?!</?think>).)*</think>\s*<answer>((?!</?answer>).)*</answer>\s*", re.DOTALL)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced


def extract_answer(text: str, max_chars: Optional[int] = MAX_COMPLETION_CHARS) -> Optional[str]:
    """The content of the last `<answer>...</answer>` (paired left to right, as `re.findall` would pair them); else
    that of the last `\\boxed{...}`; else None. A text longer than `max_chars` (None: no limit) is not read: None, as
    the rewards score such a completion 0.0 unread, so an adversarial megabyte costs nothing. Linear time: each tag
    is found once with str.find (a regex findall rescans to the end of the text from every unclosed <answer>,
    quadratic on adversarial completions)."""
    if max_chars is not None and len(text) > max_chars:
        return None
    last, pos = None, 0
    while True:
        i = text.find("<answer>", pos)
        if i < 0:
            break
        j = text.find("</answer>", i + len("<answer>"))
        if j < 0:
            break
        last, pos = (i + len("<answer>"), j), j + len("</answer>")
    if last is not None:
        return text[last[0]:last[1]].strip()
    boxed = last_boxed(text)
    return None if boxed is None else boxed.strip()


def final_answer_from_solution(solution: str) -> Optional[str]:
    """The final answer of a GSM8K solution (after its last `#### `) or a MATH one (last `\\boxed{}`), or None."""
    if "####" in solution:
        return solution.rsplit("####", 1)[1].strip()
    boxed = last_boxed(solution)
    return None if boxed is None else boxed.strip()


def format_ok(completion: str) -> bool:
    """R1's format reward: one `<think>...</think>` then one `<answer>...</answer>`, nothing else around them, and
    each of the four tags exactly once (no answer tags inside the reasoning, no think tags inside the answer)."""
    if any(completion.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    return _FORMAT_RE.fullmatch(completion) is not None


def _normalize(text: str) -> str:
    boxed = last_boxed(text)
    if boxed is not None and text.strip().startswith("\\boxed"):
        text = boxed
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\text\{[^{}]*\}|\\[,!;: ]|\\left|\\right|\$", "", text)
    text = text.replace(",", "").replace(" ", "").rstrip(".")
    return text


def to_number(text: str) -> Optional[Fraction]:
    """`text` as an exact number after normalization ("1,234", "3/4", "\\frac{3}{4}", "0.75", "12.0"), or None."""
    text = _normalize(text)
    m = re.fullmatch(r"\(?([-+]?\d+(?:\.\d+)?)\)?/\(?([-+]?\d+(?:\.\d+)?)\)?", text)
    if len(text) > MAX_NUMBER_CHARS:  # Python refuses int() of over 4300 digits; no answer needs that many
        return None
    try:
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        return Fraction(text) if re.fullmatch(r"[-+]?\d+(\.\d+)?|[-+]?\.\d+", text) else None
    except (ZeroDivisionError, ValueError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both sides are numbers, else equality of the normalized strings."""
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b
    return _normalize(predicted) == _normalize(reference) != ""


def _eval_countdown(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression of int literals, + - * /, unary minus and parentheses; ValueError otherwise."""
    if isinstance(node, ast.Expression):
        return _eval_countdown(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_countdown(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_countdown(node.left, used), _eval_countdown(node.right, used)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ValueError("division by zero")
            return a / b
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
    raise ValueError(f"not allowed in a countdown answer: {type(node).__name__}")


def verify_countdown(expression: str, numbers: list[int], target: int) -> bool:
    """True iff `expression` evaluates exactly to `target`, using each given number at most as often as given."""
    expression = expression.split("=")[0].replace("×", "*").replace("÷", "/").strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return False
    try:
        used: list[int] = []
        value = _eval_countdown(ast.parse(expression, mode="eval"), used)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if collections.Counter(used) - collections.Counter(int(x) for x in numbers):
        return False  # a number used more often than given, or not given at all
    return value == int(target)


__all__ = ["TASKS", "MAX_COMPLETION_CHARS", "generate", "options_of", "check_options", "DEFAULT_OPTIONS",
           "sft_completion", "extract_answer", "final_answer_from_solution", "format_ok",
           "verify_countdown", "answers_match", "to_number", "as_example", "example_meta",
           "last_boxed"]
