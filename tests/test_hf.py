"""HF transformers parity and checkpoint import/export.

The reference is HF's DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, random-initialised, written with
`save_pretrained` (DeepSeek's per-expert layout), imported with deepjax.model.hf.load.
"""

import os
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from deepjax.model import hf

from deepjax.model import presets
from deepjax import model as M

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

YARN_V3 = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=1.0)
YARN_V2 = dict(YARN_V3, mscale=0.707, mscale_all_dim=0.707)
SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
             num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
             kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=256, rms_norm_eps=1e-6)
LENGTHS = (1, 6, 19)  # 19 > original_max_position_embeddings: YaRN's interpolated dims matter


def _randomize(model, seed):
    """Larger-than-init weights so routing and attention are far from uniform; a random non-zero
    correction bias (HF zero-initialises it, which would leave the selection path untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "gate.weight" in name else 0.08))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2 - 0.1)
    return model


def _hf_model(kind, tmp_path):
    tr = transformers
    if kind == "v3":
        cfg = tr.DeepseekV3Config(**SHAPE, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
                                  num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, rope_scaling=YARN_V3, num_nextn_predict_layers=0)
        model = tr.DeepseekV3ForCausalLM(cfg)
    elif kind == "v2_greedy":
        cfg = tr.DeepseekV2Config(**SHAPE, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                                  num_experts_per_tok=3, topk_method="greedy", n_group=1, topk_group=1,
                                  norm_topk_prob=False, routed_scaling_factor=1.0, rope_scaling=YARN_V2)
        model = tr.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = tr.DeepseekV2Config(**SHAPE, q_lora_rank=16, n_routed_experts=8, n_shared_experts=2,
                                  num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0,
                                  rope_scaling=YARN_V2)
        model = tr.DeepseekV2ForCausalLM(cfg)
    model = _randomize(model.float().eval(), seed=len(kind))
    path = str(tmp_path / kind)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=["v3", "v2_greedy", "v2_group_limited"])
def hf_pair(request, tmp_path_factory):
    model, path = _hf_model(request.param, tmp_path_factory.mktemp("hf"))
    cfg, graphdef, params = hf.load(path)
    return request.param, model, path, cfg, graphdef, params


def test_config_imported(hf_pair):
    kind, model, _, cfg, _, _ = hf_pair
    assert cfg.scoring_func == ("sigmoid" if kind == "v3" else "softmax")
    assert cfg.topk_method == {"v3": "noaux_tc", "v2_greedy": "greedy",
                               "v2_group_limited": "group_limited_greedy"}[kind]
    assert cfg.q_lora_rank == (None if kind == "v2_greedy" else 16)
    assert cfg.rope_scaling.mscale_all_dim == (1.0 if kind == "v3" else 0.707)


@pytest.mark.parametrize("T", LENGTHS)
def test_logits_match_hf(hf_pair, T):
    kind, model, _, cfg, graphdef, params = hf_pair
    tokens = np.random.RandomState(T).randint(0, cfg.vocab_size, (3, T))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    out = M.jit_forward(graphdef, params, jnp.asarray(tokens))
    rel = np.abs(np.asarray(out.logits) - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, f"{kind} T={T}: relative error {rel:.2e}"


def test_router_selection_matches_hf(hf_pair):
    """The chosen experts themselves (sorted: HF's top-k is unsorted), not only the logits."""
    kind, model, _, cfg, graphdef, params = hf_pair
    rng = np.random.RandomState(1)
    x = rng.randn(40, cfg.hidden_size).astype(np.float32)
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        _, w_ref, idx_ref = router(torch.tensor(x))
    from deepjax.model.moe import route

    gate = np.asarray(params["moe_layers"]["ffn"]["gate"][...][0])
    bias = params["moe_layers"]["ffn"]["bias"][...][0] if cfg.topk_method == "noaux_tc" else None
    w, idx, _ = route(jnp.asarray(x @ gate), bias, cfg)
    order_ref, order = np.argsort(idx_ref.numpy(), -1), np.argsort(np.asarray(idx), -1)
    np.testing.assert_array_equal(np.take_along_axis(idx_ref.numpy(), order_ref, -1),
                                  np.take_along_axis(np.asarray(idx), order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref.numpy(), order_ref, -1), rtol=1e-5, atol=1e-7)


def test_padded_batch_matches_hf(hf_pair):
    """Rows of different lengths in one batch: right padding as segment id 0 vs HF's attention mask."""
    kind, model, _, cfg, graphdef, params = hf_pair
    lengths = [7, 3, 5]
    T = max(lengths)
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (len(lengths), T))
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    out = M.jit_forward(graphdef, params, jnp.asarray(tokens), None, jnp.asarray(mask))
    for b, n in enumerate(lengths):
        got, want = np.asarray(out.logits[b, :n]), ref[b, :n]
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, f"{kind} row {b}"


def _flat(params):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def test_export_reimport_bit_exact_and_hf_reads_it(hf_pair, tmp_path):
    kind, model, _, cfg, graphdef, params = hf_pair
    out_dir = str(tmp_path / "export")
    hf.save(out_dir, cfg, params, max_shard_bytes=60_000)  # several shards + index
    assert len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")]) > 1
    cfg2, _, params2 = hf.load(out_dir)
    assert cfg2 == cfg
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # HF itself reads the export and gives the same logits as the original model.
    cls = type(model)
    reread = cls.from_pretrained(out_dir).float().eval()
    tokens = torch.tensor(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 6)))
    with torch.no_grad():
        np.testing.assert_allclose(reread(tokens).logits.numpy(), model(tokens).logits.numpy(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    flat = nnx.to_flat_state(params)
    # A non-zero router bias so that it is actually carried.
    for path, v in flat:
        if path[-1] == "bias":
            v[...] = jax.random.uniform(jax.random.key(1), v.shape, minval=-0.1, maxval=0.1)
    params = nnx.from_flat_state(flat)
    d = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    hf.save(d, cfg, params)
    return cfg, graphdef, params, d


def test_mtp_layer_round_trip(tiny_export):
    cfg, graphdef, params, d = tiny_export
    names = load_file(os.path.join(d, "model.safetensors")).keys()
    L = cfg.num_hidden_layers
    for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "embed_tokens.weight", "shared_head.head.weight", "mlp.experts.0.up_proj.weight"):
        assert f"model.layers.{L}.{n}" in names
    cfg2, _, params2 = hf.load(d)
    assert cfg2.num_nextn_predict_layers == 1
    a, b = _flat(params), _flat(params2)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8)))
    o1, o2 = M.jit_forward(graphdef, params, tokens), M.jit_forward(graphdef, params2, tokens)
    assert np.array_equal(np.asarray(o1.mtp_logits), np.asarray(o2.mtp_logits))


def _rewrite(src, dst, edit):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_missing_extra_misshaped_tensors_are_named(tiny_export, tmp_path):
    cfg, _, _, d = tiny_export
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    _rewrite(d, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.down_proj"):
        hf.load(str(tmp_path / "missing"))
    _rewrite(d, tmp_path / "extra", lambda t: t.__setitem__("model.layers.2.mlp.experts.99.up_proj.weight",
                                                            np.zeros((2, 2), np.float32)))
    with pytest.raises(hf.CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.experts\.99"):
        hf.load(str(tmp_path / "extra"))
    bad = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite(d, tmp_path / "shape", lambda t: t.__setitem__(bad, t[bad][:-1]))
    with pytest.raises(hf.CheckpointError, match=r"kv_b_proj\.weight' in model\.safetensors has shape"):
        hf.load(str(tmp_path / "shape"))


def _quantize_fp8(w):
    """Reference E4M3 block quantization (as DeepSeek's release): per 128x128 block scale = amax / 448."""
    rows, cols = w.shape
    B = hf.FP8_BLOCK
    nb = (-(-rows // B), -(-cols // B))
    scale = np.zeros(nb, np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(nb[0]):
        for j in range(nb[1]):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B]
            s = max(np.abs(blk).max() / 448.0, 1e-12)
            scale[i, j] = s
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (blk / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def test_fp8_block_dequantization():
    w = np.random.RandomState(0).randn(300, 200).astype(np.float32)  # 3 x 2 blocks, ragged edges
    q, scale = _quantize_fp8(w)
    got = hf.dequantize_fp8(q, scale)
    want = np.zeros_like(w)
    for r in range(300):
        for c in range(200):
            want[r, c] = float(q[r, c]) * scale[r // 128, c // 128]
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - w).max() / np.abs(w).max() < 0.07  # E4M3 keeps ~3 mantissa bits
    with pytest.raises(hf.CheckpointError, match="scale_inv: shape"):
        hf.dequantize_fp8(q, scale[:1], "w")


def test_fp8_checkpoint_loads_dequantized(tiny_export, tmp_path):
    cfg, graphdef, params, d = tiny_export
    quantized = {}

    def to_fp8(t):
        for name in list(t):
            if name.endswith("proj.weight") and ".layers." in name:
                q, s = _quantize_fp8(t[name])
                t[name], t[name + "_scale_inv"] = q, s
                quantized[name] = q.astype(np.float32) * s[0, 0]  # tiny tensors are one block
    _rewrite(d, tmp_path / "fp8", to_fp8)
    _, _, p8 = hf.load(str(tmp_path / "fp8"))
    ref = load_file(os.path.join(d, "model.safetensors"))
    e = next(e for e in hf.entries(cfg) if e.name == "model.layers.1.mlp.experts.3.gate_proj.weight")
    got = np.asarray(p8["moe_layers"]["ffn"]["w_gate"][...][e.index])
    np.testing.assert_array_equal(got, quantized[e.name].T)
    assert not np.array_equal(got, ref[e.name].T)  # it really went through FP8
    # Unquantized tensors (norms, router, embedding) are untouched.
    np.testing.assert_array_equal(np.asarray(p8["embed"][...]), ref["model.embed_tokens.weight"])


def test_load_streams_one_tensor_at_a_time(tiny_export):
    """Host allocations while loading stay within the loaded params plus a few tensors: no second full
    copy. (On the CPU backend, device buffers may alias host numpy memory, so they can count here.)"""
    cfg, _, params, d = tiny_export
    param_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(params))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    largest = max(t.nbytes for t in tensors.values())
    del tensors
    hf.load(d)  # compile the slot writers first: compilation allocates too
    tracemalloc.start()
    hf.load(d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert param_bytes > 8 * largest
    assert peak < param_bytes + 3 * largest, (peak, param_bytes, largest)
