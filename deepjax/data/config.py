"""`DataConfig`: what a run trains on (deepjax/data/datasets.py builds it as TFDS, deepjax/data/pipeline.py reads
it). Standard library only, so configs load without the data stack (grain, tfds)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepjax.data import tasks
from deepjax.data.tokenizer import TEMPLATES
from deepjax.schema import check_types, checker, positive

DATA_SOURCES = ("arithmetic", "countdown", "jsonl_math", "traces", "text")
DATA_MODES = ("pretrain", "sft")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the model is trained on (deepjax/data/datasets.py builds it as TFDS, deepjax/data/pipeline.py reads it)."""

    # arithmetic | countdown (generated from seed) | jsonl_math | traces | text (local files); traces: JSONL of
    # {"question", "completion"} pairs trained verbatim (`deepjax distill` writes them)
    source: str = "arithmetic"
    path: Optional[str] = None  # jsonl_math, traces: JSONL file(s); text: text file(s); comma-separated, globs allowed
    data_dir: Optional[str] = None  # TFDS data_dir; None: <workdir>/tfds
    split: str = "train"
    mode: str = "sft"  # pretrain: every token is a target | sft: completion tokens only
    template: str = "r1"  # prompt template for question/answer sources: r1 (docs/deepseek.md, R1) | plain
    tokenizer: str = "byte"  # byte (built in) or a path to an HF tokenizer.json
    seq_len: int = 128  # packed sequence length
    global_batch: int = 16  # packed sequences per optimizer step, over all hosts
    seed: int = 0  # shuffle seed (deterministic order)
    num_train: int = 20000  # generated tasks: examples in the train split
    num_test: int = 500  # generated tasks: examples in the test split
    task_seed: int = 0  # generated tasks: the seed they are generated from
    max_digits: int = 4  # arithmetic: digits per operand (1-9; * is capped at 3 x 2 digits)
    ops: str = "+-*"  # arithmetic: the operators drawn from
    terms: int = 2  # arithmetic: operands per question (more than 2: a chain of + and -, worked step by step)
    # Share of SFT completions written free-form ("... The answer is 12.", no <answer> tags, so never rewarded),
    # drawn afresh per example each epoch: a base that computes the answer but states it in a checkable form only
    # part of the time, like a base model pretrained on web text (the weak base of the R1-Zero job).
    freeform_share: float = 0.0
    # Arithmetic (+ and -) SFT completions, drawn the same way: slip_share of them make one slip (a step's result
    # off by 1 or 2, carried on to a wrong answer); recheck_share of them check the chain by undoing it and, when
    # the check fails, work it again correctly (`tasks.sft_completion`). A careless base whose re-checked answers
    # are the reliable ones: what RL with an accuracy reward can find and reinforce (the R1-Zero job).
    slip_share: float = 0.0
    recheck_share: float = 0.0
    worker_count: int = 0  # Grain worker processes (0: in-process)

    def validate(self) -> None:
        check_types(self, "data.")
        d, fail = self, checker(self, "data")
        if d.source not in DATA_SOURCES:
            fail("source", f"unknown; choose from {DATA_SOURCES}")
        if d.mode not in DATA_MODES:
            fail("mode", f"unknown; choose from {DATA_MODES}")
        if d.template not in TEMPLATES:
            fail("template", f"unknown; choose from {tuple(TEMPLATES)}")
        if d.source in ("jsonl_math", "traces", "text") and not d.path:
            fail("path", f"data.source={d.source!r} reads local files: set data.path")
        positive(d, "data", ("seq_len", "global_batch", "num_train", "num_test"))
        positive(d, "data", ("worker_count",), strict=False)
        for name in ("freeform_share", "slip_share", "recheck_share"):
            if not 0 <= getattr(d, name) <= 1:
                fail(name, "must be in [0, 1]")
        tasks.check_options(d.source, d.max_digits, d.ops, d.terms)  # ConfigError naming the data.* field
