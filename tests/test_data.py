"""Data layer: generated tasks and their verifiers (deepjax/data/tasks.py), tokenizers (deepjax/data/tokenizer.py), and the TFDS
builders (deepjax/data/datasets.py).

All CPU, no JAX: tasks are generated from seeds, tokenizers and JSONL / text files are written into tmp_path.
"""

import collections
import json
import os
import pickle
import re

import pytest

from deepjax.data import datasets

from deepjax.data import tasks
from deepjax.rl import rewards
from deepjax.config import DataConfig
from deepjax.data.tokenizer import (R1_TEMPLATE, SPECIALS, ByteTokenizer, HFTokenizer, load_tokenizer, plain_prompt,
                               r1_prompt)

# ================================================================================================ tasks: generation


def _ok(example, completion) -> bool:
    """The accuracy reward as a verdict (GRPO's reward and `deepjax eval` use this one rule)."""
    return rewards.accuracy_reward(example, completion) == 1.0


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generate_is_deterministic_and_prefix_stable(task):
    a = tasks.generate(task, 60, seed=3, split="train")
    b = tasks.generate(task, 60, seed=3, split="train")
    assert a == b and len(a) == 60
    assert tasks.generate(task, 17, seed=3, split="train") == a[:17]
    assert tasks.generate(task, 5, seed=3, split="test") == tasks.generate(task, 20, seed=3, split="test")[:5]
    assert len({ex["question"] for ex in a}) == 60  # distinct
    assert tasks.generate(task, 60, seed=4, split="train") != a  # the seed matters
    for ex in a:
        assert set(ex) == {"question", "answer", "task", "meta"}
        assert ex["task"] == task and all(isinstance(v, str) for v in ex.values())


def test_generate_known_values():
    ex = tasks.generate("arithmetic", 1, seed=0, split="train")[0]
    expression = json.loads(ex["meta"])["expression"]
    a, op, b = expression.split()
    assert ex["question"] == f"Compute {expression}"
    assert int(ex["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


@pytest.mark.parametrize("task, n_train, n_test", [("arithmetic", 2000, 300), ("countdown", 600, 100)])
def test_train_and_test_never_share_a_question(task, n_train, n_test):
    train = {ex["question"] for seed in (0, 1) for ex in tasks.generate(task, n_train, seed, "train")}
    test = {ex["question"] for seed in (0, 1) for ex in tasks.generate(task, n_test, seed, "test")}
    assert len(test) > n_test  # two seeds give (mostly) different questions
    assert not train & test
    assert all(tasks._split_of(q) == "train" for q in train)
    assert all(tasks._split_of(q) == "test" for q in test)


def test_split_of_reserves_one_eighth_for_test():
    questions = [f"Compute {a} + {b}" for a in range(80) for b in range(50)]
    share = sum(tasks._split_of(q) == "test" for q in questions) / len(questions)
    assert abs(share - tasks.TEST_SHARE) < 0.02, share
    assert tasks._split_of("Compute 347 + 86") == tasks._split_of("Compute 347 + 86")


def test_generate_rejects_unknown_task_and_split():
    with pytest.raises(ValueError, match="task='algebra'"):
        tasks.generate("algebra", 1, 0, "train")
    with pytest.raises(ValueError, match="split='validation'"):
        tasks.generate("arithmetic", 1, 0, "validation")


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("split", tasks.SPLITS)
def test_every_example_verifies_against_its_reference(task, split):
    examples = tasks.generate(task, 300, seed=7, split=split)
    for ex in examples:
        completion = tasks.sft_completion(ex)
        assert tasks.format_ok(completion), completion
        assert _ok(ex, completion), (ex, completion)
        assert rewards.combined(ex, completion)["format"] == 1.0
        assert tasks.extract_answer(completion) == ex["answer"]
    # and a wrong answer does not
    ex = examples[0]
    meta = tasks.example_meta(ex)
    wrong = str(int(ex["answer"]) + 1) if task == "arithmetic" else f"{meta['target'] + 1}"
    assert not _ok(ex, f"<think>x</think> <answer>{wrong}</answer>")
    assert (_ok(ex, "no tags at all"), rewards.format_reward(ex, "no tags at all")) == (False, 0.0)


def test_countdown_examples_are_well_formed():
    for ex in tasks.generate("countdown", 200, seed=0, split="train"):
        meta = json.loads(ex["meta"])
        numbers, target = meta["numbers"], meta["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= x <= 50 for x in numbers)
        assert 1 <= target <= 999 and target not in numbers
        assert str(numbers) in ex["question"] and str(target) in ex["question"]
        assert meta["steps"] and meta["steps"][-1].endswith(f"= {target}")
        assert tasks.verify_countdown(ex["answer"], numbers, target)


def test_sft_completion_known_values():
    ex = {"question": "Compute 347 + 86", "answer": "433", "task": "arithmetic",
          "meta": json.dumps({"expression": "347 + 86"})}
    assert tasks.sft_completion(ex) == "<think>347 + 86 = 433</think> <answer>433</answer>"
    math = {"question": "q", "answer": "72", "task": "math", "solution": "48 + 24 = 72\n#### 72"}
    assert tasks.sft_completion(math) == "<think>48 + 24 = 72</think> <answer>72</answer>"
    # TFDS records come back as bytes
    as_bytes = {k: v.encode() for k, v in ex.items()}
    assert tasks.sft_completion(as_bytes) == tasks.sft_completion(ex)
    assert _ok(as_bytes, tasks.sft_completion(ex))
    with pytest.raises(ValueError, match="no SFT completion"):
        tasks.sft_completion({"task": "poetry", "answer": "x"})


# ================================================================================================ tasks: countdown

_CD = {"question": "Using the numbers [2, 3, 4], create an equation that equals 10.", "answer": "2 * 3 + 4",
       "task": "countdown", "meta": json.dumps({"numbers": [2, 3, 4], "target": 10, "steps": []})}


def _cd(answer: str, example: dict = _CD) -> bool:
    return _ok(example, f"<think>...</think> <answer>{answer}</answer>")


@pytest.mark.parametrize("answer", ["2 * 3 + 4", "4 * 3 - 2", "(4 * 3) - 2", "4*3-2 = 10", "4 × 3 - 2", "3*4-2",
                                    "+4*3-2", "-2 + 4 * 3", "(((2))) * 3 + 4"])
def test_countdown_accepts_any_valid_expression(answer):
    assert _cd(answer)


def test_countdown_exact_fractions_and_number_counts():
    assert tasks.verify_countdown("6 / (1 - 3 / 4)", [1, 3, 4, 6], 24)  # 24 only with exact fractions
    assert tasks.verify_countdown("8 ÷ 3 * 3", [8, 3, 3], 8)
    assert not tasks.verify_countdown("4 + 4 + 2", [2, 3, 4], 10)  # 4 used twice, given once
    assert tasks.verify_countdown("4 + 4 + 2", [4, 4, 2], 10)  # given twice: fine
    assert not tasks.verify_countdown("4 + 4 + 4 - 2", [4, 4, 2], 10)  # three 4s, two given
    assert tasks.verify_countdown("7 + 3", [3, 7, 25], 10)  # not every number has to be used
    # top-level numbers / target (not only in meta) are read too
    ex = {"question": "q", "answer": "a", "task": "countdown", "numbers": [5, 5], "target": 25}
    assert _ok(ex, "<answer>5 * 5</answer>")
    assert not _ok(ex, "<answer>5 * 5 * 5 / 5</answer>")


@pytest.mark.parametrize("answer", [
    "2 * 3 * 4",        # wrong value (24)
    "5 + 5",            # numbers not given
    "10",               # not given
    "2 * 3 + 4 + 0",    # 0 not given
    "4 + 4 + 2",        # reuse beyond count
    "2 * 3 + 4.0",      # float literal
    "2 ** 3 + 2",       # power not allowed
    "True * 10",        # bool is not an int here
    "",                 # empty
    "2 * 3 +",          # syntax error
])
def test_countdown_rejects_invalid(answer):
    assert not _cd(answer)


@pytest.mark.parametrize("expression", [
    "__import__('os')",
    "__import__('os').system('true')",
    "(10).real",
    "x",
    "abs(10)",
    "[10][0]",
    "lambda: 10",
    "10 if 1 else 2",
    "10 // 1",
    "10 % 11",
    "'10'",
    "4 / (3 - 3)",       # division by zero
    "4 / (2 * 3 - 6) + 10",
    "\0",
])
def test_countdown_rejects_code_and_errors_without_raising(expression):
    assert tasks.verify_countdown(expression, [1, 2, 3, 3, 4, 6, 10, 11], 10) is False


def test_countdown_bounds_length_and_nesting():
    ones = "+".join(["1"] * 150)  # valid, but over MAX_EXPRESSION_CHARS
    assert len(ones) > tasks.MAX_EXPRESSION_CHARS
    assert not tasks.verify_countdown(ones, [1] * 150, 150)
    assert tasks.verify_countdown("+".join(["1"] * 50), [1] * 50, 50)
    assert not tasks.verify_countdown("(" * 5000 + "1" + ")" * 5000, [1], 1)
    assert not tasks.verify_countdown("-" * 5000 + "1", [1], 1)
    deep = "(" * 90 + "10" + ")" * 90  # within the length limit: evaluated
    assert tasks.verify_countdown(deep, [10], 10)
    assert tasks.verify_countdown("-" * 190 + "10", [10], 10)  # an even number of unary minuses: +10
    assert not tasks.verify_countdown("-" * 191 + "10", [10], 10)  # odd: -10
    ex = dict(_CD, meta=json.dumps({"numbers": [1], "target": 1, "steps": []}))
    assert _ok(ex, "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>") is False


def test_countdown_deep_nesting_is_safe_even_without_the_length_bound(monkeypatch):
    monkeypatch.setattr(tasks, "MAX_EXPRESSION_CHARS", 10**7)  # the parser / evaluator must cope on their own
    assert tasks.verify_countdown("(" * 5000 + "1" + ")" * 5000, [1], 1) is False
    assert tasks.verify_countdown("-" * 50_000 + "1", [1], 1) is False
    assert tasks.verify_countdown("+".join(["1"] * 50_000), [1] * 50_000, 50_000) is False
    assert tasks.verify_countdown("+".join(["1"] * 150), [1] * 150, 150)  # long but shallow: evaluated


# ================================================================================================ tasks: checkers


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think> <answer>42</answer>", "42"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last, stripped
    ("<answer>\n7\n</answer>", "7"),
    ("so \\boxed{12}", "12"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # last, nested braces
    ("\\boxed{\\text{a {b} c}}", "\\text{a {b} c}"),
    ("<answer>5</answer> \\boxed{6}", "5"),  # <answer> wins over \boxed
    ("no answer here", None),
    ("\\boxed{unbalanced", None),
    ("<answer>unclosed", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert tasks.extract_answer(text) == expected


@pytest.mark.parametrize("predicted, reference, expected", [
    ("1,234", "1234", True),
    ("\\frac{3}{4}", "0.75", True),
    ("\\dfrac{3}{4}", "3/4", True),
    ("12.0", "12", True),
    ("12.", "12", True),
    ("\\boxed{12}", "12", True),
    ("$12$", "12", True),
    ("-5", "-5.00", True),
    ("12", "13", False),
    ("0.75", "\\frac{4}{3}", False),
    ("abc", "abc", True),
    ("abc", "abd", False),
    ("", "", False),
])
def test_answers_match(predicted, reference, expected):
    assert tasks.answers_match(predicted, reference) is expected
    assert tasks.answers_match(reference, predicted) is expected


def test_math_accuracy_uses_answers_match():
    ex = {"question": "q", "answer": "1234", "task": "math", "solution": "... #### 1234"}
    assert _ok(ex, "<think>.</think><answer>1,234</answer>")
    assert _ok(ex, "The answer is \\boxed{1234}.")
    assert not _ok(ex, "<answer>1235</answer>")
    assert not _ok(ex, "1234")  # no extractable answer (RewardConfig.last_number_fallback is off by default)
    with pytest.raises(ValueError, match="no accuracy reward"):
        _ok({"task": "poetry", "answer": "x"}, "<answer>x</answer>")


@pytest.mark.parametrize("solution, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
    ("a #### 1 #### 1,000", "1,000"),  # after the last ####
    ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then \\boxed{ 4 }", "4"),
    ("no final answer", None),
])
def test_final_answer_from_solution(solution, expected):
    assert tasks.final_answer_from_solution(solution) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>2 + 2 = 4</think> <answer>4</answer>", True),
    ("<think>a</think><answer>b</answer>", True),
    ("  <think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n", True),
    ("<think></think><answer></answer>", True),
    ("<think>a</think><think>b</think><answer>c</answer>", False),  # two think blocks
    ("<think>a <think>b</think><answer>c</answer>", False),  # nested think
    ("<think>a</think><answer>b</answer><answer>c</answer>", False),  # two answers
    ("<think>a</think>", False),  # missing answer
    ("<answer>b</answer>", False),  # missing think
    ("<answer>b</answer><think>a</think>", False),  # wrong order
    ("Sure! <think>a</think><answer>b</answer>", False),  # text before
    ("<think>a</think><answer>b</answer> done", False),  # text after
    ("<think>a</think> between <answer>b</answer>", False),  # text between
    ("<think>a<answer>b</answer>", False),  # unclosed think
    ("", False),
])
def test_format_ok(completion, expected):
    assert tasks.format_ok(completion) is expected


def test_as_example_and_example_meta():
    import numpy as np

    record = {"question": b"Compute 1 + 2", "n": np.int64(3), "arr": np.array([1, 2]), "s": "x"}
    out = tasks.as_example(record)
    assert out["question"] == "Compute 1 + 2" and type(out["n"]) is int and out["n"] == 3 and out["s"] == "x"
    assert isinstance(out["arr"], np.ndarray)  # not a scalar: left alone
    assert tasks.example_meta({"meta": b'{"numbers": [1, 2], "target": 3}'}) == {"numbers": [1, 2], "target": 3}
    assert tasks.example_meta({"meta": "", "target": 5}) == {"target": 5}


# ================================================================================================ tokenizer: byte


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 263
    assert tok.special_ids == {s: 256 + i for i, s in enumerate(SPECIALS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    text = "Compute 2 + 2 — naïve 日本語 🙂 <think>2+2=4</think> <answer>4</answer><eos>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids
    assert tok.decode(tok.encode(text, add_bos=True)) == "<bos>" + text
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("é") == [0xC3, 0xA9]
    for s, i in tok.special_ids.items():
        assert tok.encode(s) == [i]
        assert tok.encode(f"a{s}b") == [97, i, 98]
    assert tok.encode("<think") == list(b"<think")  # not a special token: bytes
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, not an error
    assert tok.encode("") == [] and tok.decode([]) == ""
    import numpy as np

    assert tok.decode(np.array(ids, dtype=np.int32)) == text


def test_byte_tokenizer_decodes_as_the_byte_runs_apart():
    """decode splices the specials' text and U+FFFD for spare ids into one UTF-8 decode: the same text as decoding
    each run of bytes between them on its own (the definition), over random rows rich in truncated and invalid
    UTF-8 sequences next to specials and spare ids."""
    import numpy as np

    tok = ByteTokenizer()
    special = {i: s for s, i in tok.special_ids.items()}

    def apart(ids):
        out, run = [], []
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out += [bytes(run).decode("utf-8", errors="replace"), special.get(i, "\ufffd")]
            run = []
        return "".join(out + [bytes(run).decode("utf-8", errors="replace")])

    rng = np.random.default_rng(0)
    pool = np.asarray([0x41, 0x7F, 0x80, 0xBF, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x99, 0x82, 0xFF]
                      + list(range(256, 263)) + [263, 5000, 31999])
    for _ in range(300):
        ids = rng.choice(pool, rng.integers(0, 24))
        assert tok.decode(ids, errors="replace") == apart(ids.tolist()), ids.tolist()
    assert tok.decode([0xE2, 0x82, 257, 0xAC]) == "\ufffd<eos>\ufffd"


@pytest.mark.parametrize("bad", [263, 1000, -1])
def test_byte_tokenizer_rejects_ids_out_of_range(bad):
    with pytest.raises(ValueError, match=str(bad)):
        ByteTokenizer().decode([104, bad])


def test_prompt_templates():
    q = "Compute 347 + 86"
    p = r1_prompt(q)
    assert q in p and p.endswith("Assistant:") and p.startswith("A conversation between User and Assistant.")
    assert p == R1_TEMPLATE.replace("{prompt}", q)
    assert "User: Compute 347 + 86. Assistant:" in p
    assert plain_prompt(q) == "Question: Compute 347 + 86\nAnswer:"
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(p)) == p
    assert tok.special_ids["<think>"] in tok.encode(p)  # the template's tags are special tokens


# ================================================================================================ tokenizer: HF


def _write_hf_tokenizer(directory, pad: bool = False) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + (["<pad>"] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Compute 347 + 86", "the answer is 433", "hello world, hello tokenizer"] * 3, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(str(directory), "tokenizer.json")
    tok.save(path)
    return path


def test_hf_tokenizer(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "tok")
    by_file, by_dir = load_tokenizer(path), load_tokenizer(str(tmp_path / "tok"))
    for tok in (by_file, by_dir):
        assert isinstance(tok, HFTokenizer) and tok.path == os.path.abspath(path)
        assert tok.bos_id == 0 and tok.eos_id == 1  # trainer special tokens come first
        assert tok.pad_id == tok.eos_id  # no PAD in the vocabulary: falls back to EOS
        assert {"<s>": 0, "</s>": 1}.items() <= tok.special_ids.items()
        assert 258 <= tok.vocab_size <= 300
    tok = by_file
    text = "hello world, Compute 12 + 34 — naïve"
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert len(tok.encode("hello world")) < len("hello world")  # merges were learned
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids
    assert tok.encode("<s>hello</s>")[0] == tok.bos_id and tok.encode("<s>hello</s>")[-1] == tok.eos_id
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "<s>" + text + "</s>"

    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, HFTokenizer) and clone.path == tok.path
    assert clone.encode(text) == ids and clone.decode(ids) == text
    assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                            tok.vocab_size)
    assert len(pickle.dumps(tok)) < 1000  # pickles as its path, not the vocabulary


def test_hf_tokenizer_pad_and_tokenizer_config(tmp_path):
    path = _write_hf_tokenizer(tmp_path, pad=True)
    tok = load_tokenizer(path)
    assert tok.pad_id == 2 and tok.pad_id != tok.eos_id
    # tokenizer_config.json names win over the built-in name lists (older files use {"content": ...})
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": {"content": "</s>"}, "eos_token": "<pad>", "pad_token": None}, f)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


def test_hf_tokenizer_malformed_tokenizer_config(tmp_path):
    _write_hf_tokenizer(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    for text in ('{"bos_token": ', '["<s>"]'):
        config.write_text(text)
        with pytest.raises(ValueError) as e:
            load_tokenizer(str(tmp_path))
        assert str(config) in str(e.value)


def test_hf_tokenizer_without_bos_is_an_error(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    with pytest.raises(ValueError, match=r"no BOS token") as e:
        load_tokenizer(path)
    assert path in str(e.value)


def test_hf_tokenizer_missing_and_malformed_files(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(missing)
    assert missing in str(e.value)
    with pytest.raises(FileNotFoundError) as e:  # a directory without tokenizer.json
        load_tokenizer(str(tmp_path))
    assert os.path.join(str(tmp_path), "tokenizer.json") in str(e.value)

    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(bad))
    assert str(bad) in str(e.value)
    bad.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(bad))
    assert str(bad) in str(e.value)


# ================================================================================================ datasets (TFDS)


def _records(source) -> list[dict]:
    return [tasks.as_example(source[i]) for i in range(len(source))]


def _key(ex: dict) -> tuple:
    return tuple(sorted(ex.items()))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_build_generated_task(tmp_path, task):
    cfg = DataConfig(source=task, num_train=40, num_test=9, task_seed=5, data_dir=str(tmp_path))
    sources = datasets.build(cfg, cfg.data_dir)
    assert set(sources) == {"train", "test"}
    assert (len(sources["train"]), len(sources["test"])) == (40, 9)
    raw = sources["train"][0]
    assert isinstance(raw["question"], bytes)  # TFDS gives bytes: as_example decodes
    for split, n in (("train", 40), ("test", 9)):
        got = _records(sources[split])
        want = tasks.generate(task, n, 5, split)
        # TFDS stores records in the order of a hash of their keys: same examples, not the same order
        assert collections.Counter(map(_key, got)) == collections.Counter(map(_key, want))
        for ex in got:
            assert _ok(ex, tasks.sft_completion(ex))
    assert os.path.isdir(tmp_path / "deepjax_tasks" / f"{task}_train40_test9_seed5" / "1.0.0")
    # a different seed is a different dataset next to it
    other = datasets.build(DataConfig(source=task, num_train=40, num_test=9, task_seed=6), str(tmp_path))
    assert {_key(r) for r in _records(other["train"])} != {_key(r) for r in _records(sources["train"])}


def test_build_twice_reuses_prepared_data(tmp_path, monkeypatch):
    cfg = DataConfig(source="arithmetic", num_train=30, num_test=6)
    first = _records(datasets.build(cfg, str(tmp_path))["train"])

    def boom(*args, **kwargs):
        raise AssertionError("regenerated the data instead of reusing it")

    monkeypatch.setattr(datasets.tasks, "generate", boom)
    monkeypatch.setattr(datasets, "read_math", boom)
    assert datasets.builder(cfg, str(tmp_path)).is_prepared()
    again = datasets.build(cfg, str(tmp_path))
    assert _records(again["train"]) == first  # same records, same order
    assert len(again["test"]) == 6
    with pytest.raises(AssertionError, match="regenerated"):  # the patch is live: an unbuilt config would call it
        datasets.build(DataConfig(source="arithmetic", num_train=31, num_test=6), str(tmp_path))


GSM8K_LINES = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    {"question": "No marker?", "answer": " 5 "},  # no ####: the whole answer is the final answer
]
MATH_LINES = [
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "Divide: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "What is $3^2$?", "solution": "We get \\boxed{9}.", "answer": "9"},
    {"problem": "Compute $2+2$.", "solution": "It is \\boxed{5}, no, 4.", "answer": "4"},  # answer field wins
]


def _write_jsonl(path, objs, blank_lines: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj) + "\n" + ("\n" if blank_lines else ""))
    return str(path)


def test_build_jsonl_math(tmp_path):
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_LINES, blank_lines=True)
    _write_jsonl(tmp_path / "math.jsonl", MATH_LINES)
    cfg = DataConfig(source="jsonl_math", path=f"{gsm}, {tmp_path}/m*.jsonl")
    sources = datasets.build(cfg, str(tmp_path / "tfds"))
    assert list(sources) == ["train"]
    records = {r["question"]: r for r in _records(sources["train"])}
    assert len(records) == len(sources["train"]) == 6
    expected = {GSM8K_LINES[0]["question"]: "72", GSM8K_LINES[1]["question"]: "1,234",
                GSM8K_LINES[2]["question"]: "5", MATH_LINES[0]["problem"]: "\\frac{1}{2}",
                MATH_LINES[1]["problem"]: "9", MATH_LINES[2]["problem"]: "4"}
    assert {q: r["answer"] for q, r in records.items()} == expected
    for r in records.values():
        assert set(r) == {"question", "answer", "solution", "task"} and r["task"] == "math"
        assert _ok(r, tasks.sft_completion(r)) and tasks.format_ok(tasks.sft_completion(r))
    gsm0 = records[GSM8K_LINES[0]["question"]]
    assert gsm0["solution"] == GSM8K_LINES[0]["answer"]
    assert "####" not in tasks.sft_completion(gsm0)
    assert _ok(records[GSM8K_LINES[1]["question"]], "<answer>1234</answer>")
    assert _ok(records[MATH_LINES[0]["problem"]], "<answer>0.5</answer>")
    # the config name hashes the contents: an edited file is a new dataset
    _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_LINES[:1])
    assert len(datasets.build(cfg, str(tmp_path / "tfds"))["train"]) == 4


def test_build_text(tmp_path):
    doc = "The first document.\nIt has two lines, and unicode: 日本語 🙂\n"
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    jl = _write_jsonl(tmp_path / "b.jsonl", [{"text": "second doc"}, {"text": ""}, {"text": "third\ndoc", "id": 3}],
                      blank_lines=True)
    cfg = DataConfig(source="text", path=f"{tmp_path}/*.txt,{jl}")
    sources = datasets.build(cfg, str(tmp_path / "tfds"))
    assert list(sources) == ["train"]
    texts = sorted(r["text"] for r in _records(sources["train"]))
    assert texts == sorted([doc, "second doc", "third\ndoc"])  # empty documents are dropped
    assert set(tasks.as_example(sources["train"][0])) == {"text"}


def test_data_errors_name_the_file_and_line(tmp_path):
    data_dir = str(tmp_path / "tfds")
    good = json.dumps(GSM8K_LINES[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: not valid JSON")):
        datasets.build(DataConfig(source="jsonl_math", path=str(bad)), data_dir)
    bad.write_text(good + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: expected a JSON object")):
        datasets.build(DataConfig(source="jsonl_math", path=str(bad)), data_dir)
    bad.write_text(good + "\n" + json.dumps({"text": "not a math record"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: expected string fields")):
        datasets.build(DataConfig(source="jsonl_math", path=str(bad)), data_dir)

    no_boxed = tmp_path / "math.jsonl"
    _write_jsonl(no_boxed, [MATH_LINES[0], {"problem": "p", "solution": "the answer is 3"}])
    with pytest.raises(ValueError, match=re.escape(f"{no_boxed}:2: the solution has no \\boxed")):
        datasets.build(DataConfig(source="jsonl_math", path=str(no_boxed)), data_dir)

    bad_text = tmp_path / "t.jsonl"
    _write_jsonl(bad_text, [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(ValueError, match=re.escape(f"{bad_text}:2: expected a string field 'text'")):
        datasets.build(DataConfig(source="text", path=str(bad_text)), data_dir)
    latin1_jsonl = tmp_path / "latin1.jsonl"
    for source, first in (("text", '{"text": "ok"}'), ("jsonl_math", good)):
        latin1_jsonl.write_bytes(first.encode() + b'\n{"text": "caf\xe9"}\n')
        with pytest.raises(ValueError, match=re.escape(f"{latin1_jsonl}:2: not UTF-8")):
            datasets.build(DataConfig(source=source, path=str(latin1_jsonl)), data_dir)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{latin1}: not UTF-8")):
        datasets.build(DataConfig(source="text", path=str(latin1)), data_dir)

    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        datasets.build(DataConfig(source="jsonl_math", path=missing), data_dir)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        datasets.build(DataConfig(source="text", path=f"{tmp_path}/nothing-*.txt"), data_dir)
    with pytest.raises(ValueError, match="data.path is not set"):
        datasets.build(DataConfig(source="text"), data_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        datasets.build(DataConfig(source="jsonl_math", path=str(empty)), data_dir)
    with pytest.raises(ValueError, match="data_dir is not set"):
        datasets.build(DataConfig(source="arithmetic"), "")
    # nothing was written for the failed builds
    assert not os.path.exists(os.path.join(data_dir, "deepjax_jsonl_math"))
    assert not os.path.exists(os.path.join(data_dir, "deepjax_text"))


def test_chain_arithmetic_slips_and_rechecks():
    """data.terms chains, data.slip_share / data.recheck_share completions: every step written is the arithmetic
    it claims except the slipped one, a slip moves the final answer by its size, and a re-check finds it and ends
    on the right answer."""
    exs = tasks.generate("arithmetic", 60, 0, "train", max_digits=1, ops="+-", terms=3)
    test = {e["question"] for e in tasks.generate("arithmetic", 60, 0, "test", max_digits=1, ops="+-", terms=3)}
    assert not test & {e["question"] for e in exs}
    step = re.compile(r"(-?\d+) ([+-]) (-?\d+) = (-?\d+)")

    def steps_ok(think):
        return [int(a) + (int(b) if op == "+" else -int(b)) == int(c) for a, op, b, c in step.findall(think)]

    for ex in exs:
        expr = tasks.example_meta(ex)["expression"]
        assert len(expr.split()) == 5 and int(ex["answer"]) == eval(expr)  # noqa: S307 (digits, + and -)
        plain = tasks.sft_completion(ex)
        assert tasks.extract_answer(plain) == ex["answer"] and all(steps_ok(plain)) and not tasks.rechecked(plain)
        slipped = tasks.sft_completion(ex, slip=2, slip_at=1)
        assert int(tasks.extract_answer(slipped)) == int(ex["answer"]) + 2
        assert steps_ok(slipped) == [True, False]
        fixed = tasks.sft_completion(ex, slip=-1, slip_at=0, recheck=True)
        assert tasks.extract_answer(fixed) == ex["answer"] and tasks.rechecked(fixed) and ", not " in fixed
        assert steps_ok(fixed).count(False) == 1  # only the slip; the check and the second pass are right
        ok = tasks.sft_completion(ex, recheck=True)
        assert ok.endswith(f", ok</think> <answer>{ex['answer']}</answer>") and all(steps_ok(ok))
    # the original task, draw for draw: two operands give the same examples as before terms existed
    assert tasks.generate("arithmetic", 5, 3, "train") == tasks.generate("arithmetic", 5, 3, "train", terms=2)


@pytest.mark.parametrize("field,value", [("terms", 1), ("terms", 6), ("slip_share", 1.5), ("recheck_share", -0.1)])
def test_chain_options_are_checked(field, value):
    from deepjax.schema import ConfigError

    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(ops="+-", **{field: value}).validate()
    with pytest.raises(ConfigError, match="data.terms"):
        DataConfig(ops="+-*", terms=3).validate()
