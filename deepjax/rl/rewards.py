"""Verifiable rewards for RL on reasoning tasks (docs/deepseek.md, R1): accuracy, format, language consistency.

Pure Python (standard library plus deepjax.data.tasks): the GRPO loop calls these on the host for every sampled completion.
Each reward is `f(example, completion, *, cfg=None) -> float` in [0, 1]:

    accuracy_reward                1.0 iff the answer solves the example (rules only, no learned reward model); also
                                   what `deepjax eval` counts as correct (rl/metrics.py), so pass@1 uses the rule
                                   the policy was trained on
        arithmetic   the last <answer>...</answer> (else the last \\boxed{...}) equals the reference as a number
                     (tasks.answers_match); an expression such as "347 + 86" is NOT evaluated: echoing the question
                     would otherwise earn the reward
        countdown    tasks.verify_countdown: + - * / and parentheses over the given numbers, each at most as often
                     as given, exactly equal to the target (exact fractions; parsed with `ast`, never eval'ed)
        math         GSM8K / MATH style: the answer against the reference (a "... #### 72" or "\\boxed{...}"
                     reference is reduced to its final answer first), by tasks.answers_match ("1,234", "0.5" vs
                     "\\frac{1}{2}", "3/4", units in \\text{}); failing that, both sides through `evaluate`, a small
                     bounded evaluator of numeric expressions ("2^{10}" = "1024", "\\frac{3}{6}" = "0.5")
    format_reward                  1.0 iff exactly one <think>...</think> followed by exactly one <answer>...</answer>,
                                   with only whitespace around them (tasks.format_ok: each of the four tags exactly
                                   once, so no <answer> tags inside the reasoning, then the layout)
    language_consistency_reward    the share of target-language words among the alphabetic words of the reasoning
                                   (the <think> part); 0.0 when it has no words at all

`combined(example, completion, cfg)` gives every component and their weighted sum "total"; the weights live in
`RewardConfig`. docs/deepseek.md, R1: R1-Zero is trained on "rule-based rewards only: accuracy ... plus format";
R1's reasoning-RL stage uses "accuracy + language-consistency reward (share of target-language words in the
reasoning)". The paper gives no weights. `R1_ZERO` (= the default) is accuracy 1.0 + format 0.1 (the format term
kept small so accuracy dominates the group-normalized GRPO advantage), language 0.0; `R1` is accuracy 1.0 + language
1.0 (summed), format 0.0.

Safety (the completion is adversarial model output):
  * no eval/exec anywhere; countdown answers go through tasks.verify_countdown (an AST walker over int literals and
    + - * /, at most tasks.MAX_EXPRESSION_CHARS chars), math answers through `evaluate` (own tokenizer + recursive
    descent parser over numbers, + - * / ^ ** parentheses braces \\frac \\cdot \\times \\div);
  * a completion longer than `cfg.max_chars` (64 Ki characters) scores 0.0 on every component without being read:
    at most that much text is ever examined. An extracted answer longer than MAX_ANSWER_CHARS scores 0.0;
  * every scan is linear: `extract_answer` re-implements tasks.extract_answer with str.find (its regex findall is
    quadratic on many unclosed <answer> tags), and the regexes here have no nested or overlapping quantifiers;
  * `evaluate` bounds its work: input length (hence tokens), recursion depth (MAX_EVAL_DEPTH), parser steps, the size of
    every intermediate result (MAX_RESULT_DIGITS: a power whose result would exceed it is refused before it is
    computed, so "9**9**9" costs nothing), and a wall-clock deadline (`cfg.eval_timeout_s`) checked inside the loop.
    No signals or threads. The length, depth and size caps alone keep a call to about a millisecond, so results are
    deterministic in practice; the step cap and the deadline are backstops;
  * nothing raises on any str (or bytes, decoded as UTF-8 with replacement) completion: lone surrogates, NUL bytes,
    unbalanced tags and braces are just text. A malformed *example* (unknown task, missing fields) still raises: that
    is a bug in the caller, not model behaviour.

Unicode digits: every Unicode decimal digit (category Nd: Arabic-Indic '٧٢', full-width '７２', Devanagari, ...) in an
extracted answer is read as the ASCII digit of the same value before checking, in every task, so '٧٢' and '７２' count
as 72 (as Python's int() and tasks.to_number already read them). Only digits are mapped: full-width operators and
superscripts are not (NFKC would turn '2²' into '22'); U+2212 MINUS SIGN is read as '-'.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import unicodedata
from fractions import Fraction
from typing import Callable, Optional

from deepjax.data import tasks

MAX_COMPLETION_CHARS = tasks.MAX_COMPLETION_CHARS  # default cfg.max_chars (64 Ki): longer completions score 0.0 unread
MAX_ANSWER_CHARS = 1000  # longer extracted answers score 0.0 (also keeps tasks.to_number under int's 4300-digit limit)
MAX_EVAL_DEPTH = 64  # nesting (parentheses, braces, unary signs, powers) accepted by `evaluate`
MAX_EVAL_STEPS = 20_000  # parser steps per `evaluate` call
MAX_RESULT_DIGITS = 1000  # numerator and denominator of every intermediate value of `evaluate`
_MAX_BITS = math.ceil(MAX_RESULT_DIGITS * math.log2(10))
EVAL_TIMEOUT_S = 0.05

# ------------------------------------------------------------------------------------------------------------- config


def _target_ascii(word: str) -> bool:
    return word.isascii()


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def _target_han(word: str) -> bool:
    return len(word) == 1 and _is_han(word)


def _target_latin(word: str) -> bool:
    return all(ch.isascii() or unicodedata.name(ch, "").startswith("LATIN ") for ch in word)


# Target language -> is this word (see _WORD_RE) in it. "en": only ASCII letters; "zh": a Han character (each is one
# word); "latin": Latin-script letters, accented ones included (fr, de, es, ...).
LANGUAGES: dict[str, Callable[[str], bool]] = {"en": _target_ascii, "zh": _target_han, "latin": _target_latin}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the reward components and the knobs of the checkers.

    total = accuracy * r_accuracy + format * r_format + language * r_language (each r in [0, 1]; weights >= 0).

    Defaults follow R1-Zero (docs/deepseek.md, R1: "rule-based rewards only: accuracy ... plus format"): accuracy 1.0,
    a small format term 0.1, no language term (0.0). R1's reasoning-RL stage instead uses "accuracy +
    language-consistency reward": see `R1` (accuracy 1.0 + language 1.0, i.e. summed).
    """

    accuracy: float = 1.0
    format: float = 0.1
    language: float = 0.0
    target_language: str = "en"  # a key of LANGUAGES
    max_chars: int = MAX_COMPLETION_CHARS  # longer completions score 0.0 on every component, unread
    eval_timeout_s: float = EVAL_TIMEOUT_S  # wall-clock backstop of one `evaluate` call
    math_expressions: bool = True  # math task: compare numeric expressions by value through `evaluate`
    last_number_fallback: bool = False  # math task: no <answer> / \boxed{} -> take the last number of the completion

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("accuracy", "format", "language"):
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"RewardConfig.{name}={w!r}: weights must be finite and >= 0")
        if self.target_language not in LANGUAGES:
            raise ValueError(f"RewardConfig.target_language={self.target_language!r}: choose from {sorted(LANGUAGES)}")
        if self.max_chars < 1 or self.eval_timeout_s <= 0:
            raise ValueError(f"RewardConfig: max_chars={self.max_chars} and eval_timeout_s={self.eval_timeout_s} "
                             f"must be positive")


DEFAULT = RewardConfig()
R1_ZERO = RewardConfig(accuracy=1.0, format=0.1, language=0.0)
R1 = RewardConfig(accuracy=1.0, format=0.0, language=1.0)

# --------------------------------------------------------------------------------------------------- text handling


def _bounded(completion, max_chars: int) -> Optional[str]:
    """The completion as str, or None when it is longer than `max_chars` (it is then not examined at all)."""
    if isinstance(completion, (bytes, bytearray)):
        if len(completion) > 4 * max_chars:  # <= 4 bytes per character: decodes to more than max_chars
            return None
        completion = bytes(completion).decode("utf-8", errors="replace")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str or bytes, got {type(completion).__name__}")
    return None if len(completion) > max_chars else completion


extract_answer = tasks.extract_answer  # linear time (str.find), the same pairing as re.findall


def reasoning_text(text: str) -> str:
    """The reasoning: between the first <think> and the next </think> (to the end if unclosed; from the start if only
    </think> is there, as when the prompt ends with <think>); "" when there is no think tag at all."""
    opened = text.find("<think>")
    start = opened + len("<think>") if opened >= 0 else 0
    closed = text.find("</think>", start)
    if opened < 0 and closed < 0:
        return ""
    return text[start:closed if closed >= 0 else len(text)]


_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")  # no overlapping quantifiers: linear


def last_number(text: str) -> Optional[str]:
    """The last number in `text` ("1,234.5", "-3"), or None."""
    found = None
    for found in _NUMBER_RE.finditer(text):
        pass
    return None if found is None else found.group(0)


def _clean_answer(answer: str) -> str:
    """Unicode decimal digits -> ASCII digits, U+2212 -> '-', '\\$' -> '$' (tasks._normalize drops '$' but not '\\')."""
    if not answer.isascii():
        answer = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in answer).replace("\u2212", "-")
    return answer.replace("\\$", "$")


def reference_answer(example: dict) -> str:
    """The reference final answer: example["answer"], reduced with tasks.final_answer_from_solution when it is a full
    GSM8K solution ("... #### 72") or ends in a \\boxed{} (MATH)."""
    answer = str(example["answer"])
    if example.get("task") == "math" and ("####" in answer or "\\boxed" in answer):
        answer = tasks.final_answer_from_solution(answer) or answer
    return _clean_answer(answer)


# ------------------------------------------------------------------------------------------ bounded safe evaluator


class _Abort(Exception):
    """Not a (supported, bounded) numeric expression."""


_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\\[a-zA-Z]+)|(\*\*|[-+*/^(){}\[\]×÷·]))")
_STRIP_RE = re.compile(r"\\left|\\right|\\[,!;: ]|\$")
_COMMANDS = {"\\frac": "frac", "\\dfrac": "frac", "\\tfrac": "frac", "\\cdot": "*", "\\times": "*", "\\div": "/"}
_SYMBOLS = {"×": "*", "·": "*", "÷": "/", "**": "^", "[": "(", "]": ")"}


def _tokenize(text: str) -> list:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            if text[pos:].isspace():
                break
            raise _Abort(f"unexpected {text[pos]!r}")
        pos = m.end()
        number, command, symbol = m.groups()
        if number is not None:
            tokens.append(Fraction(number))
        elif command is not None:
            if command not in _COMMANDS:
                raise _Abort(f"unsupported {command}")
            tokens.append(_COMMANDS[command])
        else:
            tokens.append(_SYMBOLS.get(symbol, symbol))
    return tokens


class _Evaluator:
    """Recursive descent over the tokens, exact (Fraction) arithmetic:

        sum := product (("+" | "-") product)*          product := unary (("*" | "/") unary)*
        unary := ("+" | "-") unary | power              power := atom ("^" unary)?      (right-associative)
        atom := number | "(" sum ")" | "{" sum "}" | frac arg arg     arg := "{" sum "}" | one digit (\\frac12)
    """

    def __init__(self, tokens: list, deadline: float):
        self.tokens, self.i, self.depth, self.steps, self.deadline = tokens, 0, 0, 0, deadline

    def _tick(self):
        self.steps += 1
        if self.steps > MAX_EVAL_STEPS or (self.steps % 64 == 0 and time.monotonic() > self.deadline):
            raise _Abort("too much work")

    def _peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, expected=None):
        self._tick()
        tok = self._peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Abort(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def _enter(self):
        self.depth += 1
        if self.depth > MAX_EVAL_DEPTH:
            raise _Abort("nested too deeply")

    @staticmethod
    def _check(x: Fraction) -> Fraction:
        if x.numerator.bit_length() > _MAX_BITS or x.denominator.bit_length() > _MAX_BITS:
            raise _Abort("value too large")
        return x

    def run(self) -> Fraction:
        value = self._sum()
        if self.i != len(self.tokens):
            raise _Abort(f"trailing {self._peek()!r}")
        return value

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self._product()
            value = self._check(value + rhs if op == "+" else value - rhs)
        return value

    def _product(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/"):
            op = self._take()
            rhs = self._unary()
            if op == "/" and rhs == 0:
                raise _Abort("division by zero")
            value = self._check(value * rhs if op == "*" else value / rhs)
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("+", "-"):
            op = self._take()
            self._enter()
            value = self._unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        self._enter()
        exponent = self._unary()
        self.depth -= 1
        if exponent.denominator != 1:
            raise _Abort("non-integer exponent")
        n = exponent.numerator
        if base == 0:
            if n <= 0:
                raise _Abort("0 to a non-positive power")
            return base
        if abs(base) == 1:
            return base ** (n % 2)  # +-1: only the parity matters
        bits = max(base.numerator.bit_length(), base.denominator.bit_length()) - 1  # log2 of the larger side, floored
        if abs(n) * bits > _MAX_BITS:  # refuse before computing: 9^(9^9) costs nothing
            raise _Abort("power too large")
        return self._check(base ** n)

    def _atom(self) -> Fraction:
        tok = self._take()
        if isinstance(tok, Fraction):
            return self._check(tok)
        if tok in ("(", "{"):
            self._enter()
            value = self._sum()
            self._take(")" if tok == "(" else "}")
            self.depth -= 1
            return value
        if tok == "frac":
            numerator, denominator = self._frac_arg(), self._frac_arg()
            if denominator == 0:
                raise _Abort("division by zero")
            return self._check(numerator / denominator)
        raise _Abort(f"unexpected {tok!r}")

    def _frac_arg(self) -> Fraction:
        tok = self._peek()
        if tok == "{":
            return self._atom()
        if isinstance(tok, Fraction) and tok.denominator == 1 and tok >= 0:  # \frac12: one digit per argument
            self._tick()
            digits = str(tok.numerator)
            if len(digits) == 1:
                self.i += 1
            else:
                self.tokens[self.i] = Fraction(digits[1:])  # leading zeros are harmless: a number either way
            return Fraction(int(digits[0]))
        raise _Abort("\\frac needs {..}{..}")


def evaluate(text: str, timeout_s: float = EVAL_TIMEOUT_S) -> Optional[Fraction]:
    """The exact value of a simple numeric expression, or None (unsupported, malformed, or too costly).

    Numbers (ints, decimals), + - * / ^ ** (and \\cdot \\times \\div × ÷ ·), parentheses, brackets, braces,
    \\frac / \\dfrac / \\tfrac (also \\frac12); \\left \\right and LaTeX spacing ignored, an outer \\boxed{} unwrapped.
    No variables, functions, roots or non-integer powers. Work is bounded: MAX_ANSWER_CHARS of input, MAX_EVAL_DEPTH
    of nesting, MAX_EVAL_STEPS parser steps, MAX_RESULT_DIGITS per value (checked before a power is computed),
    `timeout_s` of wall clock (checked inside the loop). Never eval/exec; never raises on a str.
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    text = _clean_answer(text).strip()
    if text.startswith("\\boxed{"):
        text = tasks.last_boxed(text) or ""
    text = _STRIP_RE.sub("", text)
    try:
        tokens = _tokenize(text)
        if not tokens:
            return None
        return _Evaluator(tokens, time.monotonic() + timeout_s).run()
    except (_Abort, ZeroDivisionError, OverflowError, ValueError, RecursionError, MemoryError):
        return None


# ----------------------------------------------------------------------------------------------------------- rewards

# kana and Han, scripts that put no spaces between words
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# A word: one kana / Han character, or a maximal run of other letters (digits, '_', punctuation, marks end it).
_WORD_RE = re.compile(f"[{_CJK}]|[^\\W\\d_{_CJK}]+")


def accuracy_reward(example: dict, completion, *, cfg: Optional[RewardConfig] = None) -> float:
    """1.0 iff the completion's final answer solves `example` (see the module docstring), else 0.0."""
    cfg = cfg or DEFAULT
    text = _bounded(completion, cfg.max_chars)
    example = tasks.as_example(example)
    task = example["task"]
    if task not in ("arithmetic", "countdown", "math"):
        raise ValueError(f"task={task!r}: no accuracy reward; known: arithmetic, countdown, math")
    meta = tasks.example_meta(example) if task == "countdown" else None  # the example's own errors do raise
    reference = reference_answer(example)
    if text is None:
        return 0.0
    predicted = extract_answer(text, max_chars=None)  # text is already bounded by cfg.max_chars
    if predicted is None and task == "math" and cfg.last_number_fallback:
        predicted = last_number(text)
    if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
        return 0.0
    predicted = _clean_answer(predicted)
    try:
        if task == "countdown":
            return float(tasks.verify_countdown(predicted, meta["numbers"], meta["target"]))
        if tasks.answers_match(predicted, reference):
            return 1.0
    except (ValueError, ArithmeticError, RecursionError, MemoryError):  # model output must never raise
        return 0.0
    if task == "math" and cfg.math_expressions:
        value = evaluate(predicted, cfg.eval_timeout_s)
        return float(value is not None and value == evaluate(reference, cfg.eval_timeout_s))
    return 0.0


def format_reward(example: dict, completion, *, cfg: Optional[RewardConfig] = None) -> float:
    """1.0 iff `<think>...</think>` then `<answer>...</answer>`, each tag exactly once, only whitespace around."""
    cfg = cfg or DEFAULT
    text = _bounded(completion, cfg.max_chars)
    if text is None:
        return 0.0
    return float(tasks.format_ok(text))  # tag counts first, then a fullmatch over single-tag bodies: linear


def words(text: str) -> list[str]:
    """The words of `text` as the language reward counts them: maximal runs of letters, each Han / kana character a
    word of its own; digits, punctuation and symbols are not words."""
    return _WORD_RE.findall(text)


def language_consistency_reward(example: dict, completion, *, cfg: Optional[RewardConfig] = None) -> float:
    """Share of target-language words among the words of the reasoning (the <think> part); 0.0 if it has none.

    Words: a maximal run of letters, except that each Han / kana character is a word of its own (those scripts put no
    spaces between words). Digits, punctuation, LaTeX symbols are not words. For "en" a word counts iff it is all
    ASCII letters ("café" and "αβ" count against it), so "Let me check 这个" is 3 of 5.
    """
    cfg = cfg or DEFAULT
    text = _bounded(completion, cfg.max_chars)
    if text is None:
        return 0.0
    words = _WORD_RE.findall(reasoning_text(text))
    if not words:
        return 0.0
    is_target = LANGUAGES[cfg.target_language]
    return sum(map(is_target, words)) / len(words)


REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy_reward, "format": format_reward, "language": language_consistency_reward}


def combined(example: dict, completion, cfg: Optional[RewardConfig] = None) -> dict[str, float]:
    """{"accuracy", "format", "language": each in [0, 1], "total": their sum weighted by `cfg`} for one completion."""
    cfg = cfg or DEFAULT
    out = {name: fn(example, completion, cfg=cfg) for name, fn in REWARDS.items()}
    out["total"] = sum(getattr(cfg, name) * value for name, value in out.items())
    return out


__all__ = ["RewardConfig", "DEFAULT", "R1_ZERO", "R1", "LANGUAGES", "REWARDS", "accuracy_reward", "format_reward",
           "language_consistency_reward", "combined", "words", "evaluate", "extract_answer", "reasoning_text",
           "last_number", "reference_answer", "MAX_COMPLETION_CHARS", "MAX_ANSWER_CHARS"]
