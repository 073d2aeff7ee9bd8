"""`deepjax convert` (deepjax/train/convert.py): HF -> run directory -> HF tensor for tensor; the run directory's
checkpoint is the init state of the imported weights, restored by the normal paths (Checkpointer with its manifest,
load_params / rl.init_from, `deepjax train` resuming it); Orbax's own checkpoints export too; FP8 out and in; memory
stays near one tensor; bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from deepjax import cli
from deepjax import model as M
from deepjax.config import from_dict, load_config, to_dict
from deepjax.model import hf, presets
from deepjax.parallel import sharding as S
from deepjax.rl import loop as RL
from deepjax.train import checkpoint as C
from deepjax.train import convert as CV
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.train import step as TS


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _flat(params):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model (MTP included) with a non-zero router bias, as an HF directory of several shards, and that
    directory converted to a run directory."""
    root = tmp_path_factory.mktemp("convert")
    cfg = presets.tiny()
    _, params = M.init(cfg, jax.random.key(0))
    flat = nnx.to_flat_state(params)
    for path, v in flat:
        if path[-1] == "bias":
            v[...] = jax.random.uniform(jax.random.key(1), v.shape, minval=-0.1, maxval=0.1)
    params = nnx.from_flat_state(flat)
    hf.save(str(root / "hf"), cfg, params, max_shard_bytes=300_000)
    out = CV.convert(str(root / "hf"), str(root / "run"), progress=False)
    assert out["to"] == "run" and out["step"] == 0
    return cfg, params, root


def test_import_is_the_init_state_of_the_weights(tiny):
    """The restored step-0 state is TS.init_state of the imported params, leaf for leaf (zero optimizer moments and
    counts, the seed's RNG), through the Checkpointer (manifest verified) and through rl.init_from's reader."""
    cfg, params, root = tiny
    run_cfg = from_dict(json.loads((root / "run" / "config.json").read_text()))
    assert run_cfg.model == cfg
    mesh, rules = S.make_mesh(run_cfg.mesh), S.rules_for(run_cfg.mesh.rules)
    _, _, optimizer, _, _, abstract = TR.abstract_train_state(run_cfg, mesh, rules)
    ck = C.Checkpointer(str(root / "run" / "checkpoints"))
    try:
        step, state, data, saved_cfg = ck.restore(abstract)
    finally:
        ck.close()
    assert step == 0 and data is None and saved_cfg == json.loads(json.dumps(to_dict(run_cfg)))
    _equal_trees(state, TS.init_state(params, optimizer, run_cfg.seed))
    step, policy = RL.restore_policy(str(root / "run"), None, run_cfg, mesh, rules)  # what rl.init_from calls
    a, b = _flat(params), _flat(policy)
    assert step == 0 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_state_metadata_is_what_orbax_writes(tiny, tmp_path):
    cfg, params, root = tiny
    run_cfg = load_config("tiny")
    mesh, rules = S.make_mesh(run_cfg.mesh), S.rules_for(run_cfg.mesh.rules)
    _, _, optimizer, _, _, abstract = TR.abstract_train_state(run_cfg, mesh, rules)
    ck = C.Checkpointer(str(tmp_path), async_save=False)
    ck.save(3, TS.init_state(params, optimizer, 0), None, {})
    ck.close()
    theirs = json.loads((tmp_path / "3" / "state" / "_METADATA").read_text())["tree_metadata"]
    assert CV.tree_metadata(CV.orbax_leaves(abstract))["tree_metadata"] == theirs


def test_hf_run_hf_is_tensor_for_tensor(tiny, tmp_path):
    cfg, _, root = tiny
    out = cli.main(["convert", str(root / "run"), str(tmp_path / "hf"), "--shard-size", "200KB", "--no-progress"])
    assert out == 0
    a, b = _tensors(root / "hf"), _tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert index["weight_map"].keys() == a.keys()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == json.loads((root / "hf" / "config.json").read_text())
    torch_st = pytest.importorskip("safetensors.torch")  # torch reads the files too (offsets, alignment)
    for f in files:
        for k, v in torch_st.load_file(str(tmp_path / "hf" / f)).items():
            assert np.array_equal(v.numpy(), a[k])


def test_fp8_export_and_import(tiny, tmp_path):
    """--fp8 writes the release's FP8 tensors (E4M3 + 128x128 scale_inv, the rest as stored); importing that directory
    dequantizes exactly like hf.load."""
    cfg, params, root = tiny
    assert CV.convert(str(root / "run"), str(tmp_path / "fp8"), fp8=True, progress=False)["to"] == "hf"
    ref, got = _tensors(root / "hf"), _tensors(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    quantized = [k for k in ref if hf.fp8_quantized(k)]
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in quantized and "lm_head.weight" not in quantized
    assert set(got) == set(ref) | {k + "_scale_inv" for k in quantized}
    for k in ref:
        if k in quantized:
            assert got[k].dtype == ml_dtypes.float8_e4m3fn and got[k + "_scale_inv"].dtype == np.float32
            q, s = hf.quantize_fp8(ref[k])
            assert np.array_equal(got[k].view(np.uint8), q.view(np.uint8)) and np.array_equal(got[k + "_scale_inv"], s)
            err = np.abs(hf.dequantize_fp8(got[k], got[k + "_scale_inv"]) - ref[k]).max() / np.abs(ref[k]).max()
            assert err < 0.07, k  # E4M3: 3 mantissa bits
        else:
            assert np.array_equal(got[k], ref[k]), k
    CV.convert(str(tmp_path / "fp8"), str(tmp_path / "run8"), progress=False)
    _, _, _, imported, _, _ = TR.load_params(str(tmp_path / "run8"))
    _, _, loaded = hf.load(str(tmp_path / "fp8"))
    a, b = _flat(loaded), _flat(imported)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_train_resumes_a_converted_run_and_its_checkpoint_exports(tiny, tmp_path):
    """`deepjax train --workdir RUN` resumes the converted step 0; the step it saves (Orbax's own OCDBT layout,
    compressed, whole-array chunks) exports to what hf.save writes of the same parameters."""
    _, _, root = tiny
    shutil.copytree(root / "run", tmp_path / "run")
    cfg = load_config("tiny", [
        "--config.data.template=plain", "--config.data.seq_len=64", "--config.data.global_batch=8",
        "--config.data.num_train=100", "--config.data.num_test=10", f"--config.data.data_dir={tmp_path}/tfds",
        "--config.train.steps=1", "--config.train.checkpoint_every=1", "--config.train.plot=false",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0"])
    last = T.train(cfg, str(tmp_path / "run"), progress=False)
    assert last["step"] == 1 and np.isfinite(last["loss"])
    assert C.list_steps(str(tmp_path / "run" / "checkpoints")) == [0, 1]
    assert CV.convert(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)["step"] == 1
    _, step, _, params, _, _ = TR.load_params(str(tmp_path / "run"))
    hf.save(str(tmp_path / "ref"), cfg.model, params)
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "hf")
    assert step == 1 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], _tensors(root / "hf")["model.embed_tokens.weight"])


def test_memory_stays_near_one_tensor(tmp_path, monkeypatch):
    """Python-side allocations (numpy included; tensorstore's own buffers are not traced: bench/convert_rss.py
    measures the process's RSS) stay within a few of the largest tensor, on a model 50x its size, both ways. (The
    manifest's CRC-32 reads files in 8 MiB pieces, a constant made small here; a first conversion warms the caches.)"""
    monkeypatch.setattr(C, "CHUNK", 1 << 16)
    model = dataclasses.replace(presets.tiny(), hidden_size=256, moe_intermediate_size=256, n_routed_experts=16,
                                num_nextn_predict_layers=0)
    total = CV.random_hf(str(tmp_path / "hf"), model, dtype="float32")
    largest = max(v.nbytes for v in _tensors(tmp_path / "hf").values())
    assert total > 50 * largest
    for traced in (False, True):
        peaks = []
        for src, dst in (("hf", "run"), ("run", "back")):
            shutil.rmtree(tmp_path / dst, ignore_errors=True)
            tracemalloc.start()
            CV.convert(str(tmp_path / src), str(tmp_path / dst), progress=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    assert max(peaks) < 4 * largest, (peaks, largest, total)
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    _, _, root = tiny

    def fails(*args):
        status = cli.main(["convert", *map(str, args), "--no-progress"])
        err = capsys.readouterr().err
        assert err.startswith("deepjax: error: ") and err.count("\n") == 1, err
        return status, err

    status, err = fails(root / "hf", root / "run")
    assert status == 2 and "exists and is not an empty directory" in err
    status, err = fails(root / "hf", tmp_path / "x", "--fp8")
    assert status == 2 and "--fp8: applies to run -> HF" in err
    status, err = fails(root / "run", tmp_path / "x", "--config.model.dtype=bfloat16")
    assert status == 2 and "applies to HF -> run" in err
    status, err = fails(root / "hf", tmp_path / "x", "--to", "hf")
    assert status == 2 and "--to hf" in err
    status, err = fails(root / "hf", tmp_path / "x", "--run-config", "bench")
    assert status == 2 and "model.vocab_size=32000 in --run-config" in err
    status, err = fails(tmp_path / "nowhere", tmp_path / "x")
    assert status == 1 and "no such directory" in err
    status, err = fails(root / "run", tmp_path / "x", "--step", "7")
    assert status == 2 and "no checkpoint step 7" in err
    # a damaged checkpoint is refused before anything is read or written
    shutil.copytree(root / "run", tmp_path / "damaged")
    chunk = tmp_path / "damaged" / "checkpoints" / "0" / "state" / "params.embed.value" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    status, err = fails(tmp_path / "damaged", tmp_path / "x")
    assert status == 2 and "checkpoint step 0 is damaged" in err and "params.embed.value" in err
    # a tensor missing from the HF directory: named, nothing written
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(str(root / "hf" / shard))
    del tensors["model.embed_tokens.weight"]
    shutil.copytree(root / "hf", tmp_path / "partial")
    save_file(tensors, str(tmp_path / "partial" / shard))
    status, err = fails(tmp_path / "partial", tmp_path / "x")
    assert status == 2 and "missing tensor 'model.embed_tokens.weight'" in err
    assert not os.path.exists(tmp_path / "x")
    # a conversion that fails half-way leaves no DEST behind
    calls = []
    real = hf.Checkpoint.read

    def read(self, name):
        calls.append(name)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(hf.Checkpoint, "read", read)
    with pytest.raises(KeyboardInterrupt):
        CV.convert(str(root / "hf"), str(tmp_path / "x"), progress=False)
    assert not os.path.exists(tmp_path / "x")


def test_help_shows_both_directions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert "deepjax convert HF_DIR RUN_DIR" in out and "deepjax convert RUN_DIR HF_DIR" in out and "--fp8" in out
