"""bench/distill_claim.py (issue 21.4): the compute accounting that matches the distilled student's SFT steps to the
GRPO student's FLOPs, against hand computations; and its table on a made-up result."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from deepjax.model import presets, transformer

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "distill_claim.py"


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("distill_claim", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_by_hand(dc):
    # one GRPO step, 8 rows of 10 prompt + 5 response tokens, N = 1000: sampling 2 + reference 2 + update 6 FLOPs/param
    assert dc.grpo_step_flops(1000, 8, 10, 5, beta=0.001, mu=1) == 10 * 1000 * 8 * 15
    assert dc.grpo_step_flops(1000, 8, 10, 5, beta=0.0, mu=1) == 8 * 1000 * 8 * 15  # no reference forward
    assert dc.grpo_step_flops(1000, 8, 10, 5, beta=0.001, mu=2) == 16 * 1000 * 8 * 15
    hist = [{"response_length": 5.0}, {"response_length": 7.0}]
    assert dc.grpo_flops(1000, hist, 8, 10.0, 0.001, 1) == 10 * 1000 * 8 * (15 + 17)
    assert dc.sft_flops(1000, 3, 4, 8) == 6 * 1000 * 3 * 4 * 8
    assert dc.sampling_flops(1000, 5, 12.0) == 2 * 1000 * 5 * 12
    # matched steps: the SFT step count whose FLOPs are nearest the target
    assert dc.matched_sft_steps(10 * 1000 * 8 * 32, 1000, 4, 8) == round(10 * 8 * 32 / (6 * 32))  # 13.3 -> 13
    assert dc.matched_sft_steps(6 * 1000 * 4 * 8 * 13.6, 1000, 4, 8) == 14  # nearest, not truncated
    assert dc.matched_sft_steps(1.0, 1000, 4, 8) == 1


def test_matmul_params_by_hand(dc):
    """tiny: all main-model parameters less the 6 unchosen experts of each MoE layer and the embedding table."""
    cfg = presets.tiny()
    _, params = transformer.abstract_init(cfg)
    total = transformer.count_params(params, include_mtp=False)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    unchosen = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * \
        cfg.moe_intermediate_size
    assert dc.matmul_params(cfg) == total - unchosen - cfg.vocab_size * cfg.hidden_size == 143504
    big = dc.scaled_model(cfg, 128, 4)
    assert (big.hidden_size, big.num_hidden_layers, big.moe_intermediate_size, big.kv_lora_rank) == (128, 4, 64, 64)
    assert dc.matmul_params(big) > 3 * dc.matmul_params(cfg)


def test_table(dc):
    ev = lambda p: {"pass@1": p, "cons@k": p + 0.1, "se": {"pass@1": 0.01, "cons@k": 0.02}}  # noqa: E731
    seed = {"seed": 0, "base": ev(0.4), "grpo": ev(0.6), "distill": ev(0.7), "sft_steps": 12,
            "traces": {"kept": 5, "samples": 8},
            "flops": {"grpo": 1e12, "sft": 1.01e12, "teacher_sampling": 3e11}}
    out = {"k": 16, "seeds": [seed],
           "teacher": {"seed": 0, "n_matmul_params": 549528, "before": ev(0.5), "after": ev(0.8),
                       "flops": {"base": 1e13, "grpo": 2e12}},
           "mean": {"base": ev(0.4), "grpo": ev(0.6), "distill": ev(0.7)}}
    t = dc.table(out)
    assert ("| 0 | 40.0 ± 1.0 | 60.0 ± 1.0 | 70.0 ± 1.0 | 70.0 ± 2.0 | 80.0 ± 2.0 | 1e+12 | 1.01e+12 (12) "
            "| 5 of 8 |") in t
    assert "| mean | 40.0 | 60.0 | 70.0 | 70.0 | 80.0 |" in t
    assert "GRPO pass@1 80.0 ± 1.0" in t
