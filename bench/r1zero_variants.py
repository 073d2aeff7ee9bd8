"""R1-Zero job variants (issue 21.1, docs/LOG.md 2026-12-05): `deepjax.rl.r1zero.run` on chained arithmetic whose
SFT base slips and re-checks, with the knobs as key=value arguments.

    PYTHONPATH=. python bench/r1zero_variants.py WORKDIR SEED steps=1200 slip=0.3 recheck=0.3 temp=0.8 \
        rl_lr=0.0001 agg=dr_grpo              # the third try: every stage, before / after printed as JSON
    PYTHONPATH=. python bench/r1zero_variants.py WORKDIR SEED stage=base   # the base and its evaluation only

Keys (default): terms (3), num_train (2000), num_test (400), freeform (0.3), slip (0.4), recheck (0.15), seq_len
(256), lr (3e-3), steps (600), rl_steps (150), rl_lr (3e-4), group (8), agg (grpo), fmt (0.1, the format reward
weight), new (112 new tokens), temp (1.0, rollout temperature), every (0: no evaluation during GRPO), problems
(256 held-out), k (16 samples each).
"""
import sys, json, time
from deepjax.rl import r1zero, evaluate
from deepjax.data.config import DataConfig
from deepjax.train.config import OptimConfig, TrainConfig
from deepjax.rl.config import EvalConfig, RLConfig
from deepjax.rl.loss import GRPOConfig
from deepjax.rl.rewards import RewardConfig
from deepjax.infer.sampling import SamplingConfig
from deepjax.config import Config
from deepjax.model import presets
workdir, seed = sys.argv[1], int(sys.argv[2])
kw = dict(a.split("=") for a in sys.argv[3:])
g = lambda k, d: type(d)(kw.get(k, d))
cfg = Config(
    model=presets.tiny(), seed=seed,
    data=DataConfig(source="arithmetic", template="plain", max_digits=1, ops="+-", terms=g("terms", 3),
                    num_train=g("num_train", 2000), num_test=g("num_test", 400), freeform_share=g("freeform", 0.3),
                    slip_share=g("slip", 0.4), recheck_share=g("recheck", 0.15), seq_len=g("seq_len", 256),
                    global_batch=16, seed=seed),
    optim=OptimConfig(lr=g("lr", 3e-3), schedule="warmup_cosine", warmup_steps=20),
    train=TrainConfig(steps=g("steps", 600), checkpoint_every=g("steps", 600), log_every=50),
    rl=RLConfig(steps=g("rl_steps", 150), prompts_per_step=16, lr=g("rl_lr", 3e-4),
                loss=GRPOConfig(beta=0.001, group_size=g("group", 8), aggregation=kw.get("agg", "grpo")),
                reward=RewardConfig(format=g("fmt", 0.1)),
                rollout=SamplingConfig(max_new_tokens=g("new", 112), temperature=g("temp", 1.0)),
                eval=EvalConfig(every=g("every", 0), problems=g("problems", 256), k=8)),
)
stage = kw.get("stage", "all")
t = time.time()
if stage == "base":
    from deepjax.train import loop as T
    T.train(cfg, f"{workdir}/base", progress=False)
    print("base s", time.time() - t, flush=True)
    t = time.time()
    res = evaluate.run(f"{workdir}/base", k=g("k", 16), problems=g("problems", 256), max_new_tokens=g("new", 112),
                       seed=seed, progress=False)
    b = r1zero.breakdown(res)  # with the re-check share and the mean length
    print("eval s", time.time() - t, json.dumps(b), flush=True)
else:
    s = r1zero.run(cfg, workdir, k=g("k", 16), progress=False)
    for w in ("before", "after"):
        print(w, json.dumps(s[w]))
    print(json.dumps(s["times"]))
