"""HF transformers greedy `generate` on the bench shape (the anchor's own measurement, at chosen batch sizes).

    python bench/anchors/hf_generate.py 1 64      # prints one JSON line per batch size
"""
import json, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_deepseek_v3 import bench_cfg  # noqa: E402


def main(batches, prompt=128, new=256):
    from transformers import DeepseekV3ForCausalLM
    torch.manual_seed(0)
    cfg = bench_cfg()
    model = DeepseekV3ForCausalLM(cfg).to("cuda", dtype=torch.bfloat16).eval()
    for bs in batches:
        p = torch.randint(0, cfg.vocab_size, (bs, prompt), device="cuda")
        with torch.no_grad():
            model.generate(p, max_new_tokens=16, do_sample=False, min_new_tokens=16)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(p, max_new_tokens=new, do_sample=False, min_new_tokens=new)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        n = (out.shape[1] - prompt) * bs
        print(json.dumps({"what": "hf_generate", "batch": bs, "new_tokens": n, "s": dt, "tokens_per_s": n / dt}),
              flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [1, 64])
