"""Anchor baseline: one GRPO iteration of TRL's `GRPOTrainer` (HF transformers `generate`) on the bench shape.

    python bench/anchors/trl_grpo.py --prompts 64 --group 8 --new 512 --mu 1 2    # one JSON line per measurement
    python bench/anchors/trl_grpo.py --hf-config tiny.json --prompts 2 --group 2 --new 8 --steps 1   # CPU smoke

Written against TRL 1.16.0 (GRPOConfig: num_generations, max_completion_length, num_iterations = mu,
per_device_train_batch_size, gradient_accumulation_steps, steps_per_generation; generation through
HF generate, use_vllm=False). `bench/grpo_bench.py` runs it beside deepjax's own loop; it is also runnable alone.

What runs, as deepjax's side of the comparison does (bench/grpo_bench.py):
  * the model: HF transformers `DeepseekV3ForCausalLM` with random weights, on the bench shape
    (`hf_deepseek_v3.bench_cfg`, the shape of `deepjax.model.presets.bench()`), or any shape given as a config.json
    dict (--hf-config); --dtype bfloat16 (default: bf16 weights, AdamW on them, as hf_deepseek_v3.py times HF's
    training; the fastest way to run TRL here) or float32 (fp32 master weights under GRPOConfig.bf16's autocast,
    what deepjax's GRPO run does), with GRPOConfig.bf16 on the GPU either way;
  * the prompts: generated arithmetic problems (deepjax.data.tasks, pure Python) in the same template, encoded by a
    byte tokenizer whose ids are deepjax's `ByteTokenizer`'s (bytes 0..255, then <bos> <eos> <pad> <think> ...; the
    rest of the model's vocabulary one character each), BOS first, so prompts have the same lengths in tokens and a
    sampled EOS (id 257) stops a row in both;
  * the reward: deepjax.rl.rewards.combined (accuracy + format + language), the function deepjax's loop scores with;
  * one iteration: --prompts x --group completions of up to --new tokens sampled at temperature 1 in one `generate`
    call (generation_batch_size = all rows), group advantages, then mu optimizer steps over the whole batch (each
    step --micro rows per forward / backward, gradient accumulation over the rest); TRL's loss_type "grpo" (the
    per-output mean, deepjax's default aggregation), beta --beta (0: no reference model), no gradient checkpointing.

Timed: wall-clock between the ends of the optimizer steps that close two iterations (torch.cuda.synchronize() in a
TrainerCallback's on_step_end), so an iteration covers everything TRL does in it: fetching the prompts, tokenizing,
generate, decoding, rewards, advantages, (mu > 1: old log-probs; beta > 0: the reference's), the mu optimizer steps
and TRL's bookkeeping between steps. `rollout_s` is the part inside `_generate_and_score_completions`.
Excluded: model creation, the trainer's construction, and one warm-up iteration before the first mu measured (CUDA
context, cuBLAS handles, the caching allocator's growth); later mus reuse the warm process without another warm-up,
each with a new model and trainer (fresh optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.append(REPO)  # deepjax.data.tasks / .tokenizer / .rl.rewards: pure Python, no jax imported


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)
    return kw


def hf_config(path: str | None):
    """The bench shape (`hf_deepseek_v3.bench_cfg`), or the config.json dict at `path` (ModelConfig.to_hf())."""
    from transformers import DeepseekV3Config

    if path is None:
        from hf_deepseek_v3 import bench_cfg
        return bench_cfg()
    with open(path) as f:
        return DeepseekV3Config(**json.load(f))


def byte_tokenizer(vocab_size: int):
    """An HF fast tokenizer with deepjax's ByteTokenizer ids: one id per byte of ASCII text (0..255), then
    deepjax.data.tokenizer.SPECIALS (<bos> <eos> <pad> special, the think / answer tags plain added tokens, kept in
    decoded text), then one private-use character per remaining id of the model's vocabulary (deepjax decodes such
    ids as one U+FFFD each: the same length of text to score)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deepjax.data.tokenizer import SPECIALS

    vocab = {chr(i): i for i in range(256)}
    vocab.update({s: 256 + j for j, s in enumerate(SPECIALS)})
    vocab.update({chr(0xF0000 + i): i for i in range(256 + len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # concatenated, no spaces between tokens
    tok.add_special_tokens([AddedToken(s, normalized=False) for s in SPECIALS[:3]])
    tok.add_tokens([AddedToken(s, normalized=False) for s in SPECIALS[3:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   padding_side="left")


def prompt_rows(n: int, template: str, seed: int = 0) -> list[dict]:
    """n generated arithmetic problems (deepjax.data.tasks, train split) as TRL dataset rows; "prompt" is the
    template text with the BOS deepjax's prompts start with."""
    from deepjax.data import tasks
    from deepjax.data.tokenizer import TEMPLATES

    return [{"prompt": "<bos>" + TEMPLATES[template](ex["question"]), "question": ex["question"],
             "answer": ex["answer"], "task": ex["task"], "meta": ex["meta"]}
            for ex in tasks.generate("arithmetic", n, seed, "train")]


class Reward:
    """The reward function (deepjax.rl.rewards.combined's total, as deepjax's loop scores), recording the
    completion lengths it saw."""

    __name__ = "deepjax_combined"

    def __init__(self):
        from deepjax.rl import rewards
        self.combined, self.lengths = rewards.combined, []

    def __call__(self, prompts, completions, completion_ids, question, answer, task, meta, **_):
        self.lengths = [len(c) for c in completion_ids]
        return [self.combined({"question": q, "answer": a, "task": t, "meta": m}, c)["total"]
                for q, a, t, m, c in zip(question, answer, task, meta, completions)]


def run_mu(args, cfg, tokenizer, rows, mu: int, warmup: int, device: str, workdir: str) -> dict:
    import torch
    from transformers import DeepseekV3ForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = DeepseekV3ForCausalLM(cfg).to(dtype)  # autocast to bf16 on the GPU (GRPOConfig.bf16) either way
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if args.beta > 0:  # TRL builds its reference with from_pretrained(model.config's name): a saved copy
        path = os.path.join(workdir, f"init_mu{mu}")
        model.save_pretrained(path)
        model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)

    n_rows = args.prompts * args.group
    micro = min(args.micro, n_rows)
    if n_rows % micro:
        raise SystemExit(f"--micro {micro} must divide prompts x group = {n_rows}")
    iters = warmup + args.steps
    conf = GRPOConfig(
        output_dir=os.path.join(workdir, f"out_mu{mu}"), seed=0, data_seed=0,
        num_generations=args.group, max_completion_length=args.new, num_iterations=mu, beta=args.beta,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n_rows // micro,  # generation batch = all rows
        temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=1e-6, lr_scheduler_type="constant", max_steps=iters * mu,
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False)
    times: list[float] = []
    rollout: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):  # after the optimizer and the dataloader are made
            sync()
            times.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    reward = Reward()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=conf, train_dataset=rows_dataset(rows),
                          processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.remove_callback(PrinterCallback)  # its dicts on stdout are not JSON lines
    inner = trainer._generate_and_score_completions

    def timed(*a, **kw):  # the rollout half: generate, decode, rewards, advantages, old / ref log-probs
        sync()
        t = time.perf_counter()
        out = inner(*a, **kw)
        sync()
        rollout.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    ends = times  # ends[k]: end of optimizer step k (ends[0]: the start of training)
    per_iter = [ends[(i + 1) * mu] - ends[i * mu] for i in range(iters)]
    timed_iters = per_iter[warmup:]
    out = {"mu": mu, "s_per_iteration": statistics.median(timed_iters), "iterations_s": timed_iters,
           "rollout_s": rollout[warmup:], "warmup_s": per_iter[:warmup], "rows": n_rows, "micro": micro,
           "new_tokens": args.new, "mean_completion_tokens": sum(reward.lengths) / max(len(reward.lengths), 1),
           "beta": args.beta, "dtype": args.dtype}
    if cuda:
        out["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return out


def rows_dataset(rows):
    from datasets import Dataset
    return Dataset.from_list(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--mu", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=1, help="timed iterations per mu")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations before the first mu")
    ap.add_argument("--micro", type=int, default=32, help="rows per forward / backward (per_device_train_batch_size)")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the model's weights (bfloat16: pure bf16 training; float32: bf16 autocast over fp32)")
    ap.add_argument("--template", default="plain", help="prompt template (deepjax.data.tokenizer.TEMPLATES)")
    ap.add_argument("--hf-config", default=None, help="a config.json dict of the model; default the bench shape")
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers
        import trl
        import datasets
    except ImportError as e:
        emit(what="trl_grpo", skipped=f"TRL anchor not run: {e} (carry the trl / datasets wheels: "
                                      "bench/grpo_bench.py's docstring)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = hf_config(args.hf_config)
    emit(what="trl_versions", trl=trl.__version__, transformers=transformers.__version__, torch=torch.__version__,
         datasets=datasets.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
         shape="bench" if args.hf_config is None else args.hf_config)
    tokenizer = byte_tokenizer(cfg.vocab_size)
    n_iters = args.warmup + args.steps * len(args.mu)
    rows = prompt_rows(max(args.prompts * (n_iters + 1), 256), args.template)
    workdir = tempfile.mkdtemp(prefix="trl_grpo_")
    try:
        for i, mu in enumerate(args.mu):
            try:
                emit(what="trl_grpo", **run_mu(args, cfg, tokenizer, rows, mu, args.warmup if i == 0 else 0, device,
                                               workdir))
            except Exception as e:  # one line, and the next mu still runs (an OOM at mu 2 says so)
                emit(what="trl_grpo", mu=mu, error=f"{type(e).__name__}: {str(e)[:400]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
