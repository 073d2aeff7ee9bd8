"""Inference: the sampler over the compressed MLA cache (`sampling`), text in and out (`text`), and the fused /
Pallas fast path (`fast/`) that `sampling` calls behind one function."""
