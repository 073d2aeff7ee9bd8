"""The fast one-device decode path: per-layer weights fused once per call (`fused`), with Pallas (Triton) kernels
(`kernels` for decode steps, `grouped` for the prefill's experts, `common` for what both share). Entered only
through `deepjax.infer.sampling`."""
