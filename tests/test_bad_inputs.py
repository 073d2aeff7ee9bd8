"""Malformed inputs (issue 23): every case runs the `deepjax` command in-process (`cli.main`) on one bad config file,
override, data file, tokenizer file, mesh / batch or RL limit, and must exit with status 2 and print one line that
names the field, file or line; never a traceback. Each is refused before a model is built or compiled (the
config at load, the mesh before the run starts, files where the run first reads them), so the table runs in seconds.

Also here: a damaged checkpoint or a stopped run is one line and status 2 as well, a bug keeps its traceback, and the
checkers' length cap (`tasks.extract_answer` does not read a 5 MB completion).
"""

import json
import os
import time

import pytest

from deepjax import cli
from deepjax.config import load_config, to_dict
from deepjax.data import tasks
from deepjax.errors import CheckpointError, NonFiniteError
from deepjax.model import presets

GOOD_GSM8K = json.dumps({"question": "Compute 2 + 2", "answer": "2 + 2 = 4\n#### 4"})

CONFIG_FILES = {
    "syntax.py": "from deepjax.config import Config\n\n\ndef get_config(:\n    return Config()\n",
    "importerr.py": "import deepjax_no_such_module\n",
    "raises.py": "from deepjax.config import Config\n\n\ndef get_config():\n    raise RuntimeError('no quota')\n",
    "noget.py": "X = 1\n",
    "notconfig.py": "def get_config():\n    return {'model': 'tiny'}\n",
    "nameerr.py": "from deepjax.config import Config\nCFG = Confg()\n",
    "typeerr.py": ("from deepjax.config import Config, ModelConfig\n\n\ndef get_config():\n"
                   "    return Config(model=ModelConfig(hiden_size=8))\n"),
    "grpo100.py": ("from deepjax.config import Config, RLConfig\nfrom deepjax.rl.loss import GRPOConfig\n\n\n"
                   "def get_config():\n    return Config(rl=RLConfig(loss=GRPOConfig(max_log_ratio=100.0)))\n"),
    "floatint.py": ("import dataclasses\nfrom deepjax.config import Config\nfrom deepjax.model import presets\n\n\n"
                    "def get_config():\n"
                    "    return Config(model=dataclasses.replace(presets.tiny(), hidden_size=64.0))\n"),
    "infinit.py": ("import dataclasses\nfrom deepjax.config import Config\nfrom deepjax.model import presets\n\n\n"
                   "def get_config():\n    m = presets.tiny()\n"
                   "    return Config(model=dataclasses.replace(m, initializer_range=float('inf')))\n"),
    "loads_bad.py": ("from deepjax.config import load_config\n\n\ndef get_config():\n"
                     "    return load_config('tiny', ['--config.optim.b1=1.5'])\n"),
}

DATA_FILES = {
    "badjson.jsonl": GOOD_GSM8K + "\n\n" + '{"question": "x", "answer": \n',
    "nokeys.jsonl": GOOD_GSM8K + "\n" + json.dumps({"text": "not a math record"}) + "\n",
    "empty.jsonl": "\n\n",
    "intanswer.jsonl": json.dumps({"question": "Compute 70 + 2", "answer": 72}) + "\n",
    "listanswer.jsonl": json.dumps({"problem": "p", "solution": "so \\boxed{1}", "answer": [1]}) + "\n",
    "array.jsonl": "[1, 2]\n",
    "nested.jsonl": "[" * 100_000 + "\n",
    "bigint.jsonl": '{"question": "q", "answer": ' + "9" * 5000 + "}\n",
    "noboxed.jsonl": json.dumps({"problem": "p", "solution": "the answer is 3"}) + "\n",
    "emptyq.jsonl": json.dumps({"question": " ", "answer": "#### 3"}) + "\n",
    "notext.jsonl": json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text field"}) + "\n",
}
BINARY_FILES = {
    "garbage.jsonl": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # an image given as data
    "latin1.txt": "caf\xe9".encode("latin-1"),
    "nulls.py": b"\x00\x01\x02garbage\n",
    "tok_garbage.json": bytes(range(255, -1, -1)) * 4,
}


def _word_tokenizer(path: str, words: list[str]) -> None:
    """A word-level tokenizer.json (the `tokenizers` library), its ids in the order of `words`."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> str:
    """The directory of every bad file of the table."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, text in {**CONFIG_FILES, **DATA_FILES}.items():
        (root / name).write_text(text)
    for name, data in BINARY_FILES.items():
        (root / name).write_bytes(data)
    good = str(root / "tok_good" / "tokenizer.json")
    _word_tokenizer(good, ["<s>", "</s>", "[UNK]", "hello", "world"])
    text = open(good).read()
    (root / "tok_trunc.json").write_text(text[:len(text) // 2])
    (root / "tok_empty_obj.json").write_text("{}")
    (root / "tok_zero.json").write_text("")
    _word_tokenizer(str(root / "tok_nobos" / "tokenizer.json"), ["[UNK]", "hello", "world"])
    _word_tokenizer(str(root / "tok_big" / "tokenizer.json"), ["<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(600)])
    _word_tokenizer(str(root / "tok_badcfg" / "tokenizer.json"), ["<s>", "</s>", "[UNK]", "hello"])
    (root / "tok_badcfg" / "tokenizer_config.json").write_text('{"bos_token": ')
    (root / "tok_dir").mkdir()
    # run directories for `deepjax sample`: a config.json the run could not have written
    for name, edit in (("run_logratio", lambda c: c["rl"]["loss"].update(max_log_ratio=100.0)),
                       ("run_inf", lambda c: c["model"].update(initializer_range=float("inf"))),
                       ("run_b1", lambda c: c["optim"].update(b1=1.0))):
        cfg = to_dict(load_config("tiny"))
        edit(cfg)
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
    (root / "run_trunc" / "checkpoints").mkdir(parents=True)
    (root / "run_trunc" / "config.json").write_text('{"model": {"hidden_size": ')
    return str(root)


JSONL = ["--config.data.source=jsonl_math"]
TEXT = ["--config.data.source=text", "--config.data.mode=pretrain"]


def info(*args):
    return ["info", *args]


def train(*overrides):
    return ["train", "tiny", "--workdir", "{d}/runs/{case}", "--no-progress", *overrides]


def data(name, *more):
    return train(*(more or JSONL), f"--config.data.path={{d}}/{name}")


def tok(spec, *more):
    return train(f"--config.data.tokenizer={{d}}/{spec}", *more)


# (case id, argv ({d}: the files' directory, {case}: the id), substrings the one error line must hold)
CASES = [
    # ---- config files: the file and line, the exception named
    ("file-syntax", info("{d}/syntax.py"), ["syntax.py:4", "SyntaxError"]),
    ("file-import", info("{d}/importerr.py"), ["importerr.py:1", "deepjax_no_such_module"]),
    ("file-raises", info("{d}/raises.py"), ["raises.py:5", "RuntimeError: no quota"]),
    ("file-no-get-config", info("{d}/noget.py"), ["noget.py", "defines no get_config()"]),
    ("file-not-a-config", info("{d}/notconfig.py"), ["notconfig.py", "returned dict, not a Config"]),
    ("file-name-error", info("{d}/nameerr.py"), ["nameerr.py:2", "NameError", "Confg"]),
    ("file-bad-kwarg", info("{d}/typeerr.py"), ["typeerr.py:5", "TypeError", "hiden_size"]),
    ("file-grpo-limit", info("{d}/grpo100.py"), ["grpo100.py:6", "GRPOConfig.max_log_ratio", "80"]),
    ("file-float-for-int", info("{d}/floatint.py"), ["model.hidden_size: expected int, got 64.0"]),
    ("file-inf", info("{d}/infinit.py"), ["model.initializer_range=inf"]),
    ("file-nested-load", info("{d}/loads_bad.py"), ["loads_bad.py:5", "optim.b1=1.5"]),
    ("file-null-bytes", info("{d}/nulls.py"), ["nulls.py"]),
    ("file-missing", info("{d}/nothing_here.py"), ["nothing_here.py", "does not exist"]),
    ("preset-unknown", info("tiny_typo"), ["'tiny_typo'", "no such file or preset"]),
    # ---- overrides: syntax and unknown keys
    ("override-not-int", info("tiny", "--config.model.hidden_size=abc"), ["model.hidden_size", "'abc'"]),
    ("override-unknown-key", info("tiny", "--config.model.hidden=64"), ["unknown override key 'hidden'"]),
    ("override-unknown-section", info("tiny", "--config.modle.x=1"), ["unknown override key 'modle'"]),
    ("override-no-value", info("tiny", "--config.model.hidden_size"), ["must look like --config.FIELD=VALUE"]),
    ("override-empty-key", info("tiny", "--config.model..x=1"), ["empty override key"]),
    ("override-sub-config", info("tiny", "--config.model.rope_scaling=yes"), ["model.rope_scaling: is a sub-config"]),
    ("override-bool", info("tiny", "--config.train.plot=maybe"), ["train.plot", "'maybe'"]),
    ("override-seed", info("tiny", "--config.seed=x"), ["config.seed: expected int"]),
    ("unknown-argument", ["train", "tiny", "--bogus"], ["--bogus"]),
    # ---- non-finite and out-of-range values, each named up front
    ("model-initializer-inf", info("tiny", "--config.model.initializer_range=inf"), ["model.initializer_range=inf"]),
    ("model-rope-theta-nan", info("tiny", "--config.model.rope_theta=nan"), ["model.rope_theta=nan"]),
    ("model-yarn-factor-inf", info("tiny", "--config.model.rope_scaling.factor=inf"),
     ["model.rope_scaling.factor=inf"]),
    ("model-top-k", info("tiny", "--config.model.num_experts_per_tok=9"), ["model.num_experts_per_tok=9"]),
    ("optim-lr-inf", info("tiny", "--config.optim.lr=inf"), ["optim.lr=inf"]),
    ("optim-lr-zero", info("tiny", "--config.optim.lr=0"), ["optim.lr=0.0"]),
    ("optim-b1-above-1", info("tiny", "--config.optim.b1=1.5"), ["optim.b1=1.5", "[0, 1)"]),
    ("optim-b1-negative", info("tiny", "--config.optim.b1=-0.1"), ["optim.b1=-0.1"]),
    ("optim-b2-one", info("tiny", "--config.optim.b2=1"), ["optim.b2=1.0", "[0, 1)"]),
    ("optim-eps-zero", info("tiny", "--config.optim.eps=0"), ["optim.eps=0.0"]),
    ("optim-weight-decay-nan", info("tiny", "--config.optim.weight_decay=nan"), ["optim.weight_decay=nan"]),
    ("optim-clip-inf", info("tiny", "--config.optim.clip_norm=inf"), ["optim.clip_norm=inf"]),
    ("optim-micro-batches", info("tiny", "--config.optim.micro_batches=3"), ["optim.micro_batches=3"]),
    ("optim-schedule", info("tiny", "--config.optim.schedule=linear"), ["optim.schedule='linear'"]),
    ("train-mtp-lambda-nan", info("tiny", "--config.train.mtp_lambda=nan"), ["train.mtp_lambda=nan"]),
    ("train-balance-negative", info("tiny", "--config.train.balance_alpha=-1"), ["train.balance_alpha=-1.0"]),
    ("train-steps-zero", info("tiny", "--config.train.steps=0"), ["train.steps=0"]),
    ("train-peak-inf", info("tiny", "--config.train.peak_tflops=inf"), ["train.peak_tflops=inf"]),
    ("data-seq-len-context", info("tiny", "--config.data.seq_len=2048"),
     ["data.seq_len=2048", "model.max_position_embeddings=1024"]),
    ("data-seq-len-yarn", info("tiny", "--config.model.rope_scaling.factor=10", "--config.data.seq_len=4096"),
     ["data.seq_len=4096", "YaRN", "256 x 10 = 2560"]),
    ("data-freeform-share", info("tiny", "--config.data.freeform_share=1.5"), ["data.freeform_share=1.5"]),
    ("data-source", info("tiny", "--config.data.source=wiki"), ["data.source='wiki'"]),
    ("data-path-unset", info("tiny", *JSONL), ["data.path"]),
    ("data-max-digits", info("tiny", "--config.data.max_digits=12"), ["data.max_digits=12"]),
    ("data-ops", info("tiny", "--config.data.ops=+/"), ["data.ops='+/'"]),
    ("data-global-batch-zero", info("tiny", "--config.data.global_batch=0"), ["data.global_batch=0"]),
    ("mesh-zero", info("tiny", "--config.mesh.data=0"), ["mesh.data=0"]),
    ("mesh-two-fills", info("tiny", "--config.mesh.data=-1"), ["at most one axis may be -1"]),
    ("mesh-rules", info("tiny", "--config.mesh.rules=bogus"), ["mesh.rules='bogus'"]),
    # ---- RL limits: one definition (GRPOConfig's), whichever way the value comes in
    ("rl-max-log-ratio", info("tiny", "--config.rl.loss.max_log_ratio=100"),
     ["rl.loss.max_log_ratio=100.0", "(0, 80]"]),
    ("rl-max-log-ratio-nan", info("tiny", "--config.rl.loss.max_log_ratio=nan"), ["rl.loss.max_log_ratio=nan"]),
    ("rl-eps-low", info("tiny", "--config.rl.loss.eps_low=1.5"), ["rl.loss.eps_low=1.5"]),
    ("rl-group-size", info("tiny", "--config.rl.loss.group_size=1"), ["rl.loss.group_size=1"]),
    ("rl-tis-cap", info("tiny", "--config.rl.loss.tis_cap=0.5"), ["rl.loss.tis_cap=0.5"]),
    ("rl-temperature-inf", info("tiny", "--config.rl.rollout.temperature=inf"), ["rl.rollout.temperature=inf"]),
    ("rl-top-p", info("tiny", "--config.rl.rollout.top_p=0"), ["rl.rollout.top_p=0.0"]),
    ("rl-eval-top-p", info("tiny", "--config.rl.eval.top_p=2"), ["rl.eval.top_p=2.0"]),
    ("rl-reward-nan", info("tiny", "--config.rl.reward.accuracy=nan"), ["rl.reward.accuracy=nan"]),
    ("rl-lr-inf", info("tiny", "--config.rl.lr=inf"), ["rl.lr=inf"]),
    ("rl-steps-zero", info("tiny", "--config.rl.steps=0"), ["rl.steps=0"]),
    ("run-config-log-ratio", ["sample", "{d}/run_logratio", "--prompt", "hi"], ["rl.loss", "max_log_ratio"]),
    ("run-config-inf", ["sample", "{d}/run_inf", "--prompt", "hi"], ["model.initializer_range=inf"]),
    ("run-config-b1", ["sample", "{d}/run_b1", "--prompt", "hi"], ["optim.b1=1.0"]),
    ("run-config-truncated", ["sample", "{d}/run_trunc", "--prompt", "hi"], ["run_trunc/config.json", "JSON"]),
    # ---- data files: the file and line
    ("jsonl-bad-line", data("badjson.jsonl"), ["{d}/badjson.jsonl:3: not valid JSON"]),
    ("jsonl-missing-keys", data("nokeys.jsonl"), ["{d}/nokeys.jsonl:2: expected string fields"]),
    ("jsonl-empty", data("empty.jsonl"), ["empty.jsonl", "no examples"]),
    ("jsonl-binary", data("garbage.jsonl"), ["{d}/garbage.jsonl:1: not UTF-8"]),
    ("jsonl-int-answer", data("intanswer.jsonl"), ["{d}/intanswer.jsonl:1:", "'answer': int"]),
    ("jsonl-list-answer", data("listanswer.jsonl"), ["{d}/listanswer.jsonl:1: 'answer' must be a string"]),
    ("jsonl-not-object", data("array.jsonl"), ["{d}/array.jsonl:1: expected a JSON object, got list"]),
    ("jsonl-deep-nesting", data("nested.jsonl"), ["{d}/nested.jsonl:1: not valid JSON"]),
    ("jsonl-huge-int", data("bigint.jsonl"), ["{d}/bigint.jsonl:1: not valid JSON"]),
    ("jsonl-no-boxed", data("noboxed.jsonl"), ["{d}/noboxed.jsonl:1:", "\\boxed"]),
    ("jsonl-empty-question", data("emptyq.jsonl"), ["{d}/emptyq.jsonl:1: the question is empty"]),
    ("jsonl-missing-file", data("nope.jsonl"), ["{d}/nope.jsonl", "names no file"]),
    ("jsonl-glob-no-match", data("nothing-*.jsonl"), ["nothing-*.jsonl", "names no file"]),
    ("text-no-text-field", data("notext.jsonl", *TEXT), ["{d}/notext.jsonl:2: expected a string field 'text'"]),
    ("text-not-utf8", data("latin1.txt", *TEXT), ["{d}/latin1.txt: not UTF-8"]),
    # ---- tokenizer files: the file
    ("tokenizer-truncated", tok("tok_trunc.json"), ["could not read tokenizer file {d}/tok_trunc.json"]),
    ("tokenizer-empty-object", tok("tok_empty_obj.json"), ["could not read tokenizer file {d}/tok_empty_obj.json"]),
    ("tokenizer-empty-file", tok("tok_zero.json"), ["could not read tokenizer file {d}/tok_zero.json"]),
    ("tokenizer-binary", tok("tok_garbage.json"), ["could not read tokenizer file {d}/tok_garbage.json"]),
    ("tokenizer-missing", tok("no_such_tokenizer.json"), ["tokenizer file not found: {d}/no_such_tokenizer.json"]),
    ("tokenizer-dir-without-file", tok("tok_dir"), ["tokenizer file not found: {d}/tok_dir/tokenizer.json"]),
    ("tokenizer-no-bos", tok("tok_nobos"), ["{d}/tok_nobos/tokenizer.json: no BOS token"]),
    ("tokenizer-config-broken", tok("tok_badcfg"), ["{d}/tok_badcfg/tokenizer_config.json"]),
    ("tokenizer-vocab-too-big", tok("tok_big"), ["model.vocab_size=512", "603 ids"]),
    # ---- the mesh and the batch against the 8 test devices (tests/conftest.py)
    ("mesh-data-3", train("--config.mesh.data=3"), ["mesh.data=3", "8 devices"]),
    ("mesh-all-fixed", train("--config.mesh.fsdp=3"), ["mesh.fsdp=3", "needs 3 devices, have 8"]),
    ("mesh-tensor-16", train("--config.mesh.tensor=16"), ["mesh.tensor=16", "8 devices"]),
    ("mesh-dcn-3", train("--config.mesh.dcn_data=3"), ["mesh.dcn_data=3", "8 devices"]),
    ("mesh-tensor-8-params", train("--config.mesh.tensor=8"), ["not divisible by mesh axis tensor (size 8)",
                                                               "change mesh.tensor"]),  # before any dataset
    ("batch-3-on-8", train("--config.data.global_batch=3"), ["data.global_batch=3", "8 batch shards"]),
    ("batch-12-on-8", train("--config.data.global_batch=12"), ["data.global_batch=12", "8 batch shards"]),
    ("batch-on-data-and-fsdp", train("--config.mesh.data=2", "--config.data.global_batch=4"),
     ["data.global_batch=4", "data=2 x fsdp=4"]),
    ("grpo-rollouts-on-8", ["grpo", "tiny", "--workdir", "{d}/runs/{case}", "--no-progress",
                            "--config.rl.prompts_per_step=3", "--config.rl.loss.group_size=2"],
     ["rl.prompts_per_step x rl.loss.group_size = 3 x 2", "8 batch shards"]),
]


def _fill(s: str, d: str, case: str) -> str:
    return s.replace("{d}", d).replace("{case}", case)


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(case, argv, expected, d, capsys):
    t = time.perf_counter()
    try:
        status = cli.main([_fill(a, d, case) for a in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("deepjax: error: "), err
    for s in expected:
        assert _fill(s, d, case) in lines[0], (s, lines[0])
    assert time.perf_counter() - t < 20, "refused too late: a bad input must not build the model"


def test_the_table_covers_each_kind_of_input():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"file", "override", "optim", "train", "data", "rl", "jsonl", "text", "tokenizer", "mesh", "batch",
            "grpo", "run"} <= kinds
    assert len(CASES) >= 61


@pytest.mark.parametrize("error, line", [
    (CheckpointError("checkpoint step 60 is damaged: file x is missing\n(set --config.train.fallback_on_damage=true "
                     "to fall back)"), "deepjax: error: checkpoint step 60 is damaged: file x is missing (set --config"),
    (NonFiniteError("step 7: the loss or gradient was not finite for 3 steps"), "deepjax: stopped: step 7: the loss"),
])
def test_run_errors_are_one_line_and_status_2(error, line, monkeypatch, tmp_path, capsys):
    def fails(cfg, workdir, progress):
        raise error
    monkeypatch.setattr(cli.T, "train", fails)
    assert cli.main(["train", "tiny", "--workdir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    """Not a blanket except: what is not a user error propagates, from the run and from deepjax code a config file
    calls (the file's own errors are the user's: the table above)."""
    def bug(cfg, workdir, progress):
        return {}["missing"]
    monkeypatch.setattr(cli.T, "train", bug)
    with pytest.raises(KeyError):
        cli.main(["train", "tiny", "--workdir", str(tmp_path), "--no-progress"])
    monkeypatch.setattr(presets, "tiny", lambda: {}["model"])
    path = tmp_path / "uses_tiny.py"
    path.write_text("from deepjax.config import Config\nfrom deepjax.model import presets\n\n\ndef get_config():\n"
                    "    return Config(model=presets.tiny())\n")
    with pytest.raises(KeyError):
        load_config(str(path))


def test_checkers_do_not_read_a_megabyte_completion():
    """tasks.extract_answer reads at most tasks.MAX_COMPLETION_CHARS characters, as the rewards read at most
    RewardConfig.max_chars: a 5 MB completion (here: 600,000 answer tags) costs nothing and has no answer."""
    huge = "<answer>1</answer>" * 300_000
    t = time.perf_counter()
    for _ in range(10):
        assert tasks.extract_answer(huge) is None
    assert time.perf_counter() - t < 0.05
    at_cap = "x" * (tasks.MAX_COMPLETION_CHARS - len("<answer>7</answer>")) + "<answer>7</answer>"
    assert tasks.extract_answer(at_cap) == "7"
    assert tasks.extract_answer(at_cap + " ") is None
    assert tasks.extract_answer(huge, max_chars=None) == "1"  # a caller that bounded the text itself
