"""The DeepSeek-V3 MoE-MLA transformer: NNX modules used functionally, its config, presets and HF checkpoints.

The package exports the functional interface of `transformer.py` (`init`, `forward`, `jit_forward`,
`abstract_init`, the parameter inventory and the sharded init), so `from deepjax import model; model.init(...)`
reads as before. The modules, bottom up: config -> layers, rope -> mla, moe -> expert_parallel -> transformer;
presets and hf build on config / transformer.
"""

from deepjax.model.transformer import (ACT_AXES, Cache, Output, Transformer, abstract_init, count_active_params,
                                       count_params, default_experts_fn, forward, init, init_sharded, jit_forward,
                                       logical_axes, mtp_targets, param_shardings, param_table, path_str,
                                       precast_experts, spec_table)

__all__ = ["ACT_AXES", "Cache", "Output", "Transformer", "abstract_init", "count_active_params", "count_params",
           "default_experts_fn", "forward", "init", "init_sharded", "jit_forward", "logical_axes", "mtp_targets",
           "param_shardings", "param_table", "path_str", "precast_experts", "spec_table"]
