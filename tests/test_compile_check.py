"""The compiled-FLOPs check (deepjax.train.hlo_flops, deepjax.train.compile_check): loop-aware matmul FLOPs read
from the optimized HLO, against hand counts and against the model's FLOPs for the training step on the CPU."""

import jax
import jax.numpy as jnp
import pytest

from deepjax import model as M
from deepjax.model import presets
from deepjax.parallel import sharding as S
from deepjax.train import compile_check as CC
from deepjax.train import hlo_flops as H


def _count(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return H.count(compiled.as_text()), compiled


def test_scanned_matmuls_are_counted_per_trip():
    def f(x, w):
        def body(c, wi):
            return jnp.tanh(c @ wi), None

        return jax.lax.scan(body, x, w)[0].sum()

    x, w = jnp.ones((64, 128)), jnp.ones((10, 128, 128))
    r, compiled = _count(jax.grad(f, argnums=1), x, w)
    assert r.total == 3 * 10 * 2 * 64 * 128 * 128  # forward, and the two products of the backward, 10 times
    assert r.unknown_loops == [] and sorted(n for _, n in r.loops) == [10, 10]
    assert compiled.cost_analysis()["flops"] < r.total / 5  # XLA's own figure counts each body once
    # traffic: at least each step's weight slice read in the forward and again in the backward
    assert r.bytes >= 2 * 10 * 128 * 128 * 4


def test_nested_loops_batched_dots_and_branches():
    def f(x, w, p):
        def inner(c, _):
            return jnp.einsum("bmk,bkn->bmn", c, w), None

        def outer(c, _):
            return jax.lax.scan(inner, c, None, length=3)[0], None

        y = jax.lax.scan(outer, x, None, length=4)[0]
        # the most expensive branch counts: 2 x 4 x 32^3 (the other branch has no matmul)
        z = jax.lax.cond(p, lambda a: a @ a, lambda a: a + 1, y[0])
        return z

    x, w = jnp.ones((4, 32, 32)), jnp.ones((4, 32, 32))
    r, _ = _count(f, x, w, True)
    per_einsum = 2 * 4 * 32 * 32 * 32
    assert r.total == 12 * per_einsum + 2 * 32 * 32 * 32
    # the count fails loudly when a loop's trip count is unknown rather than guessing silently
    assert r.unknown_loops == []


def test_trip_count_read_from_the_loop_condition():
    hlo = """HloModule m
%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %y = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(%j, %y)
}
%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
ENTRY %main (a: f32[8,8]) -> (s32[], f32[8,8]) {
  %a = f32[8,8]{1,0} parameter(0)
  %z = s32[] constant(2)
  %t = (s32[], f32[8,8]{1,0}) tuple(%z, %a)
  ROOT %w = (s32[], f32[8,8]{1,0}) while(%t), condition=%cond, body=%body
}
"""
    r = H.count(hlo)
    assert r.derived_loops == ["w"] and r.loops == [("w", 5)]  # 7 - 2 trips
    assert r.total == 5 * 2 * 8 * 8 * 8


def test_custom_call_cost_estimate_and_shape_fallback():
    est = ('{"custom_call_config":{"body":"xx","cost_estimate":{"flops":"1000","transcendentals":"0",'
           '"bytes_accessed":"1"}}}')
    hlo = f"""HloModule m
ENTRY %main (a: bf16[4,128,256], b: bf16[4,128,256], c: bf16[4,128,128]) -> bf16[128,64] {{
  %a = bf16[4,128,256]{{2,1,0}} parameter(0)
  %b = bf16[4,128,256]{{2,1,0}} parameter(1)
  %c = bf16[4,128,128]{{2,1,0}} parameter(2)
  %k = bf16[128,64]{{1,0}} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={est}
  %s = bf16[4,128,128]{{2,1,0}} custom-call(%a, %b, %c), custom_call_target="tpu_custom_call", metadata={{op_name="jit(f)/splash_mha_fwd/pallas_call"}}
  %x = bf16[96,256]{{1,0}} parameter(3)
  %w = bf16[4,256,64]{{2,1,0}} parameter(4)
  %g = s32[4]{{0}} parameter(5)
  %y = bf16[96,64]{{1,0}} custom-call(%x, %w, %g), custom_call_target="mosaic_gpu", metadata={{op_name="jit(f)/ragged_dot/pallas_call"}}
  %dy = bf16[96,64]{{1,0}} parameter(6)
  %dw = f32[4,256,64]{{2,1,0}} custom-call(%x, %dy, %g), custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="jit(f)/grouped_dw/pallas_call"}}
  ROOT %u = bf16[128,64]{{1,0}} custom-call(%a), custom_call_target="mystery"
}}
"""
    r = H.count(hlo, CC.kernel_flops)
    assert r.kernels["tpu_custom_call"] == 1000
    assert r.kernels["splash_mha_fwd"] == 2 * 4 * 128 * 128 * (256 + 128)
    # grouped matmuls without an estimate: every row once, 2 M K N for the product and for the weight gradient
    assert r.kernels["ragged_dot"] == r.kernels["grouped_dw"] == 2 * 96 * 256 * 64
    assert r.uncounted == ["mystery"]


@pytest.mark.parametrize("remat", ["none", "full", "save_experts"])
def test_train_step_flops_match_the_model_on_cpu(remat):
    """The compiled tiny training step (one CPU device, XLA experts) does the model's matmul work plus the named
    overheads, within 15%: the XLA blocked experts' padding rows and, under remat, the recomputed forward (all of
    it under full, all but the routed experts' products under save_experts)."""
    import dataclasses

    cfg = dataclasses.replace(presets.tiny(), remat=remat)
    compiled, _, mesh = CC.compile_step(cfg, jax.devices()[:1], S.MeshConfig(), 2, 64)
    _, abstract = M.abstract_init(cfg)
    rep = CC.report(compiled, cfg, abstract, 2, 64, mesh)
    assert rep["loops"]["unknown_trip_count"] == 0
    assert rep["flops_check"], rep
    assert rep["overhead_per_chip"]["expert_rows"] > 0
    assert (rep["overhead_per_chip"]["remat"] > 0) == (remat != "none")
    assert rep["flops_xla_per_chip"] < rep["flops_per_chip"]


def test_local_topology_needs_published_peaks():
    """`--topology local` compiles for this machine's devices and divides by the GPU's published peaks; a device
    kind without them (this CPU) is one error naming the kind, before anything is compiled."""
    gpu = type("D", (), {"device_kind": "NVIDIA H200"})()
    assert CC.local_peaks(gpu) == (989e12, 4.8e12, 141.0)
    with pytest.raises(SystemExit, match="no published peaks for device kind"):
        CC.main(["bench", "--topology", "local", "--batch", "1", "--seq", "8"])


def test_gpu_program_custom_calls():
    """XLA:GPU's forms (read from a real H100 program of the bench step): dots as cuBLAS custom calls, a sort with
    no matmul work, tokamax's Mosaic GPU kernels named by the jax name before `mpmd_map` ([B, T, N, d] attention
    forward and its two backward kernels), and kernels whose backend config is a compiled module in a quoted
    string with unbalanced braces, which must not swallow the next instruction."""
    gemm = ('{"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],'
            '"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}')
    blob = 'backend_config={debug = false, ir = "ML\\EFR{{{\\00\\01"}'
    hlo = f"""HloModule m
ENTRY %main (a: bf16[256,64], b: bf16[64,32]) -> f32[256,32] {{
  %a = bf16[256,64]{{1,0}} parameter(0)
  %b = bf16[64,32]{{1,0}} parameter(1)
  %q = bf16[2,128,4,96]{{3,2,1,0}} parameter(2)
  %v = bf16[2,128,4,64]{{3,2,1,0}} parameter(3)
  %x = bf16[96,256]{{1,0}} parameter(4)
  %dy = bf16[96,64]{{1,0}} parameter(5)
  %g = s32[4]{{0}} parameter(6)
  %s = (s32[96]{{0}}, s32[96]{{0}}, u8[100]{{0}}) custom-call(%g), custom_call_target="xla.gpu.ext.cub_sort_pairs"
  %f = bf16[2,128,4,64]{{3,2,1,0}} custom-call(%q, %q, %v), custom_call_target="mosaic_gpu_v2", metadata={{op_name="jit(f)/vmap()/flash_attention_sm90/mpmd_map"}}, {blob}
  %d1 = f32[4,256,64]{{2,1,0}} custom-call(%g, %g, %x, %dy), custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="jit(f)/grouped_dw/pallas_call"}}, {blob}
  %d2 = f32[4,256,64]{{2,1,0}} custom-call(%g, %g, %x, %dy), custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="jit(f)/grouped_dw/pallas_call"}}, {blob}
  %bw = bf16[2,128,4,128]{{3,2,1,0}} custom-call(%q, %q, %v), custom_call_target="mosaic_gpu_v2", metadata={{op_name="jit(f)/vmap()/batched_body/mpmd_map"}}, {blob}
  ROOT %c = (f32[256,32]{{1,0}}, s8[1024]{{0}}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={gemm}
}}
"""
    r = H.count(hlo, CC.kernel_flops)
    assert r.uncounted == []
    assert r.kernels["cublas"] == 2 * 256 * 32 * 64
    assert r.kernels["xla.gpu.ext.cub_sort_pairs"] == 0
    heads = 2 * 4  # B x N of [B, T, N, d]
    assert r.kernels["flash_attention_sm90"] == r.kernels["batched_body"] == 2 * heads * 128 * 128 * (96 + 64)
    assert r.kernels["grouped_dw"] == 2 * (2 * 96 * 256 * 64)  # both weight gradients: none swallowed


def test_traffic_of_slices_and_in_place_updates():
    """Memory traffic: a (fused or async) dynamic slice of a stacked operand reads the slice, not the stack, and a
    dynamic-update-slice into a buffer writes the update in place; counting whole operands charged a scanned
    layer's weights as the whole stack on every trip."""
    hlo = """HloModule m
%slice_body (p0: f32[10,128,128], p1: s32[]) -> f32[1,128,128] {
  %p0 = f32[10,128,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,128,128]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,128,128}
}
%update_body (q0: f32[10,128,128], q1: f32[1,128,128], q2: s32[]) -> f32[10,128,128] {
  %q0 = f32[10,128,128]{2,1,0} parameter(0)
  %q1 = f32[1,128,128]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[10,128,128]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %z, %z)
}
ENTRY %main (w: f32[10,128,128], i: s32[]) -> f32[10,128,128] {
  %w = f32[10,128,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %s = f32[1,128,128]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%slice_body
  %a = ((f32[10,128,128]{2,1,0}, s32[]), f32[1,128,128]{2,1,0}, u32[]) fusion-start(%w, %i), kind=kLoop, calls=%slice_body
  %d = f32[1,128,128]{2,1,0} fusion-done(%a)
  ROOT %u = f32[10,128,128]{2,1,0} fusion(%w, %s, %i), kind=kLoop, calls=%update_body
}
"""
    r = H.count(hlo)
    layer = 128 * 128 * 4
    # each slice: read a layer, write a layer (+ the index); the update: read the update, write it in place
    assert r.bytes == 2 * (2 * layer + 4) + (2 * layer + 4)
