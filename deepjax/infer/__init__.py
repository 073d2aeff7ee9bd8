"""Inference: the sampler over the compressed MLA cache (`sampling`), the next token's draw from logits (`draw`),
text in and out (`text`), and the fused / Pallas fast path (`fast/`) that `sampling` calls behind one function."""
