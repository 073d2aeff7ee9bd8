"""`deepjax sample` (deepjax/infer/sample.py): the streaming loop equals `sampling.generate`, greedy output equals
`text.complete`, streamed text equals the final text, the tokens/s line, run and HF checkpoint directories, chat
templates, and one line with exit status 2 for every bad input."""

from __future__ import annotations

import io
import json
import os
import re

import jax
import numpy as np
import pytest

from deepjax import cli
from deepjax import model as M
from deepjax.config import load_config, to_dict
from deepjax.data.tokenizer import ByteTokenizer, load_tokenizer
from deepjax.infer import sample as SA
from deepjax.infer import sampling as SP
from deepjax.infer import text
from deepjax.model import hf
from deepjax.parallel import sharding as S
from deepjax.train import run as TR
from deepjax.train import step as TS
from deepjax.train.checkpoint import Checkpointer

STATS = re.compile(r"^(\d+) tokens in \d+\.\d\d s \(\d+\.\d tokens/s\)$")
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset without MTP, weights drawn large (peaked distributions: decisive greedy choices)."""
    cfg = load_config("tiny", ["--config.model.initializer_range=0.2", "--config.model.num_nextn_predict_layers=0"])
    graphdef, params = M.init(cfg.model, jax.random.key(0))
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    """A run directory as `deepjax train` leaves it (config.json, an Orbax checkpoint), written directly."""
    cfg, _, params = tiny
    d = tmp_path_factory.mktemp("run")
    mesh, rules = S.make_mesh(S.MeshConfig(fsdp=1), devices=jax.devices()[:1]), S.rules_for(cfg.mesh.rules)
    optimizer = TR.abstract_train_state(cfg, mesh, rules)[2]
    ck = Checkpointer(str(d / "checkpoints"), async_save=False)
    ck.save(3, TS.init_state(params, optimizer, cfg.seed), None, to_dict(cfg), force=True)
    ck.close()
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    return str(d)


def _byte_level_tokenizer(path):
    """A byte-level BPE tokenizer.json without merges (DeepSeek's kind of tokenizer, one token per byte), <s> / </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    cfg, _, params = tiny
    d = tmp_path_factory.mktemp("hf")
    hf.save(str(d), cfg.model, params)
    _byte_level_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": CHAT}))
    return str(d)


def _main(args, capsys):
    """(status, stdout, stderr) of `deepjax ARGS` in this process (argparse's errors exit)."""
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_device():
    return S.make_mesh(S.MeshConfig(fsdp=1), devices=jax.devices()[:1]), S.rules_for("fsdp_expert_tensor")


# ---- the streaming loop ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "top_k_top_p"])
def test_generate_rows_equals_generate(tiny, sampled):
    """Same tokens, lengths, stops and log-probs as `sampling.jit_generate` (one device), rows stopping at an EOS
    (every fifth id is one: the rows stop at different steps) or at max_new_tokens."""
    _, graphdef, params = tiny
    P, L = SP.pad_prompts([[5, 17, 300, 9], [9, 1, 2, 3, 4, 5, 6, 7, 8]], multiple=16)
    key = jax.random.key(3)
    sc = SP.SamplingConfig(max_new_tokens=12, temperature=0.8 if sampled else 0.0, top_k=50 if sampled else 0,
                           top_p=0.9 if sampled else 1.0, eos_ids=tuple(range(0, 512, 5)), pad_id=262)
    want = SP.jit_generate(graphdef, params, P, L, key, sc)
    got = SA.generate_rows(graphdef, params, P, L, key, sc)
    assert bool(want.done.any())
    np.testing.assert_array_equal(got.tokens, np.asarray(want.tokens))
    np.testing.assert_array_equal(got.lengths, np.asarray(want.lengths))
    np.testing.assert_array_equal(got.done, np.asarray(want.done))
    np.testing.assert_allclose(got.logprobs, np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)


def test_text_stream_pieces_join_to_the_text():
    tok = ByteTokenizer()
    # whole and split characters, a special token, invalid and cut UTF-8, an id outside the vocabulary
    ids = tok.encode("héllo 世界<think>") + [0xFF, 0xE4, 0xB8] + tok.encode("!") + [300, 0xF0]
    s = SA.TextStream(tok)
    pieces = [s.push([i]) for i in ids] + [s.flush()]
    assert "".join(pieces) == tok.decode(ids, errors="replace")
    assert pieces[:3] == ["h", "", "é"] and pieces[-7:-3] == ["", "", "", "\ufffd\ufffd!"]  # whole characters only
    assert "世" in pieces and "<think>" in pieces and all(not p.endswith("\ufffd") for p in pieces[:-1])


# ---- the command -----------------------------------------------------------------------------------------------

def test_greedy_run_dir_equals_text_complete_streamed(tiny, run_dir, capsys):
    cfg, graphdef, params = tiny
    rc, out, err = _main(["sample", run_dir, "--prompt", "What is 2 + 3?", "--temperature", "0",
                          "--max-new-tokens", "24"], capsys)
    assert rc == 0, err
    tok = load_tokenizer("byte")
    ids = text.prompt_ids(tok, cfg.data.template, ["What is 2 + 3?"])
    mesh, rules = _one_device()
    want = text.complete(graphdef, params, tok, ids, jax.random.key(0),
                         SP.SamplingConfig(max_new_tokens=24, temperature=0.0), mesh, rules)
    body, last = out[:-1].rsplit("\n", 1)
    assert body == want.texts[0]
    m = STATS.match(last)
    assert m and int(m.group(1)) == int(want.lengths[0])
    assert "step 3" in err and "template plain" in err


def test_streamed_text_is_the_final_text(tiny, run_dir, capsys):
    """Sampled at temperature 1 from the random model (invalid UTF-8, unknown ids): what was written as it came
    joins to the decoded completion, written in many pieces."""
    cfg, graphdef, params = tiny
    src = SA.Source(run_dir, "run", cfg.model, graphdef, params, ByteTokenizer(), "plain", None)
    sc = SP.SamplingConfig(max_new_tokens=40, temperature=1.0)
    src, ids, sc = SA.encode(src, ["Tell me"], None, sc)

    class Pieces(io.StringIO):
        writes: list = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    out = Pieces()
    res = SA.run(src, ["Tell me"], ids, sc, seed=1, out=out, log=io.StringIO())
    P, L = SP.pad_prompts(ids, pad_id=src.tokenizer.pad_id, multiple=16)
    ref = SA.generate_rows(graphdef, params, P, L, jax.random.key(1), sc)
    n = int(ref.lengths[0]) - int(ref.done[0])
    assert res.texts[0] == src.tokenizer.decode(ref.tokens[0, :n], errors="replace")
    streamed = out.getvalue().rsplit("\n", 2)[0]
    assert streamed == res.texts[0] and sum(bool(w) for w in out.writes[:-2]) > 5
    assert STATS.match(out.getvalue().splitlines()[-1]) and res.tokens == int(ref.lengths[0])


def test_hf_dir_prompts_file_chat_template(tiny, hf_dir, tmp_path, capsys):
    """An HF checkpoint with a byte-level tokenizer.json and a chat template (the default there); three prompts
    from a file (JSON lines and a plain line), each printed when done, batch 2: two generate calls."""
    cfg, graphdef, params = tiny
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "2 + 2"}\n\nwhat is 7 - 3?\n{"prompt": "hi", "id": 3}\n')
    rc, out, err = _main(["sample", hf_dir, "--prompts-file", str(f), "--temperature", "0", "--max-new-tokens", "8",
                          "--batch", "2"], capsys)
    assert rc == 0, err
    assert "template chat; 3 prompt(s)" in err
    lines = out.splitlines()
    assert sorted(x for x in lines if x.startswith("=== ")) == ["=== 1/3: 2 + 2", "=== 2/3: what is 7 - 3?",
                                                              "=== 3/3: hi"]
    assert STATS.match(lines[-1])
    tok = load_tokenizer(hf_dir)
    ids = SA.prompt_ids(tok, "chat", ["hi"], hf_dir)[0]
    assert tok.decode(ids) == "<s><|user|>hi<|assistant|>" and ids.count(tok.bos_id) == 1
    # the third prompt (second batch, alone): the greedy completion of text.complete
    mesh, rules = _one_device()
    want = text.complete(graphdef, params, tok, [ids], jax.random.key(0),
                         SP.SamplingConfig(max_new_tokens=8, temperature=0.0), mesh, rules)
    after = out.split("=== 3/3: hi\n", 1)[1]
    assert after.startswith(want.texts[0] + "\n")


# ---- errors: one line, status 2 ---------------------------------------------------------------------------------

def _errors(run_dir, hf_dir, tmp):
    empty = tmp / "empty.txt"
    empty.write_text("\n  \n")
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    (tmp / "neither").mkdir()
    no_tok = tmp / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    (no_tok / "model.safetensors").write_bytes(b"")
    unsaved = tmp / "unsaved"
    (unsaved / "checkpoints").mkdir(parents=True)
    (unsaved / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    p = ["--prompt", "x"]
    return [
        (["sample", str(tmp / "nowhere"), *p], "nowhere: no such directory"),
        (["sample", str(empty), *p], "not a directory"),
        (["sample", str(tmp / "neither"), *p], "neither a deepjax run directory"),
        (["sample", str(no_tok), *p], "tokenizer.json: no tokenizer file"),
        (["sample", str(unsaved), *p], "no checkpoint saved yet"),
        (["sample", run_dir, *p, "--step", "99"], "no checkpoint step 99"),
        (["sample", hf_dir, *p, "--step", "1"], "--step 1"),
        (["sample", run_dir, "--prompts-file", str(empty)], "--prompts-file"),
        (["sample", run_dir, "--prompts-file", str(tmp / "missing.txt")], "missing.txt: no such file"),
        (["sample", run_dir, "--prompts-file", str(bad_jsonl)], "bad.jsonl:2"),
        (["sample", run_dir], "no prompt"),
        (["sample", *p], "source"),
        (["sample", run_dir, *p, "--top-p", "1.5"], "--top-p"),
        (["sample", run_dir, *p, "--temperature", "warm"], "--temperature"),
        (["sample", run_dir, *p, "--max-new-tokens", "0"], "--max-new-tokens"),
        (["sample", run_dir, *p, "--top-k", "-1"], "--top-k"),
        (["sample", run_dir, *p, "--template", "chat"], "no chat_template"),
        (["sample", run_dir, *p, "--tokenizer", str(tmp / "tok.json")], "tok.json: no tokenizer file"),
        (["sample", run_dir, *p, "--config.model.dtype=float13"], "model.dtype"),
        (["sample", run_dir, *p, "--config.model.num_hidden_layers=2"], "model.num_hidden_layers=2"),
        (["sample", run_dir, *p, "--config.sampling.top_k=3"], "--top-k"),
        (["sample", run_dir, *p, "--config.sampling.mtp_draft=true"], "mtp_draft"),
        (["sample", run_dir, *p, "--config.sampling.cache_len=16"], "sampling.cache_len=16"),
        (["sample", run_dir, *p, "--bogus"], "--bogus"),
    ]


def test_errors_exit_2_with_one_line(run_dir, hf_dir, tmp_path, capsys):
    for args, needle in _errors(run_dir, hf_dir, tmp_path):
        rc, out, err = _main(args, capsys)
        assert rc == 2, (args, err)
        assert err.startswith("deepjax: error: ") and err.count("\n") == 1 and needle in err, (args, err)
        assert "Traceback" not in err and not out, (args, out)
