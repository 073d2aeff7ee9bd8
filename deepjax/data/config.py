"""`DataConfig`: what a run trains on (deepjax/data/datasets.py builds it as TFDS, deepjax/data/pipeline.py reads
it). Standard library only, so configs load without the data stack (grain, tfds)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepjax.data import tasks
from deepjax.data.tokenizer import TEMPLATES
from deepjax.schema import check_types, checker, positive

DATA_SOURCES = ("arithmetic", "countdown", "jsonl_math", "text")
DATA_MODES = ("pretrain", "sft")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the model is trained on (deepjax/data/datasets.py builds it as TFDS, deepjax/data/pipeline.py reads it)."""

    source: str = "arithmetic"  # arithmetic | countdown (generated from seed) | jsonl_math | text (local files)
    path: Optional[str] = None  # jsonl_math: JSONL file(s); text: text file(s); comma-separated, globs allowed
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
    # Share of SFT completions written free-form ("... The answer is 12.", no <answer> tags, so never rewarded),
    # drawn afresh per example each epoch: a base that computes the answer but states it in a checkable form only
    # part of the time, like a base model pretrained on web text (the weak base of the R1-Zero job).
    freeform_share: float = 0.0
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
        if d.source in ("jsonl_math", "text") and not d.path:
            fail("path", f"data.source={d.source!r} reads local files: set data.path")
        positive(d, "data", ("seq_len", "global_batch", "num_train", "num_test"))
        positive(d, "data", ("worker_count",), strict=False)
        if not 0 <= d.freeform_share <= 1:
            fail("freeform_share", "must be in [0, 1]")
        tasks.check_options(d.source, d.max_digits, d.ops)  # ConfigError naming data.max_digits / data.ops
