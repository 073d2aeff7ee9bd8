"""Grain input pipelines: records -> tokens -> packed rows -> per-host batches, with a checkpointable iterator.

    it = pipeline.make_iterator(cfg.data, tok, sources["train"], local_batch=16)
    batch = next(it)       # {"tokens", "segment_ids", "positions", "target_mask"}: int32 [local_batch, seq_len]
    state = it.get_state() # JSON-able; `it.set_state(state)` continues with exactly the next batch

Stages (a Grain `MapDataset`, then an `IterDataset`):

1. `shuffle(data.seed)` then `repeat()`: a deterministic order, reshuffled every epoch, a pure function of the seed.
2. Host slice: process p of P reads records p, p+P, p+2P, ... of that order, so hosts never read the same record
   and each loads only its own rows of the global batch.
3. `Tokenize` (a top-level class, so Grain worker processes can pickle it). Question/answer sources:

       [BOS] template(question) completion [EOS]        completion = tasks.sft_completion(example)

   `data.mode=sft` marks only the completion and EOS as targets, `pretrain` every token. Text: [BOS] text [EOS],
   all targets, split by `Chunk` into pieces of at most `seq_len` tokens (each piece its own document).
4. First-fit packing (`grain.experimental.FirstFitPackIterDataset`) into rows of `seq_len`: segment ids 1, 2, ...
   per document and 0 on padding, positions restart at 0 in each document. The model masks attention by segment
   id (deepjax/model/mla.py), so no token ever attends across documents; the loss skips targets in another document.
5. `batch(local_batch)`; with `data.worker_count > 0`, Grain worker processes (`mp_prefetch`).

A target mask value m[i] = 1 means token i is a training target (predicted from position i-1):
deepjax/train/step.py's `depth_targets` reads it that way.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import grain
from absl import flags
import numpy as np

from deepjax.data import tasks
from deepjax.data.tokenizer import TEMPLATES
from deepjax.errors import DataError

FIELDS = ("tokens", "segment_ids", "positions", "target_mask")


class Tokenize(grain.transforms.RandomMap):
    """A record (as TFDS stores it) -> {"tokens", "target_mask"} int32 arrays (see the module docstring). With
    freeform_share > 0 that share of question/answer completions is written free-form (`tasks.sft_completion`),
    drawn from Grain's per-element generator: a pure function of data.seed and the element's place in the order."""

    def __init__(self, tokenizer, mode: str, template: str, seq_len: int, text: bool, freeform_share: float = 0.0,
                 slip_share: float = 0.0, recheck_share: float = 0.0):
        self.tokenizer, self.mode, self.template, self.seq_len, self.text = tokenizer, mode, template, seq_len, text
        self.freeform_share, self.slip_share, self.recheck_share = freeform_share, slip_share, recheck_share

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        kw = {"freeform": bool(self.freeform_share and rng.random() < self.freeform_share)}
        if self.slip_share and rng.random() < self.slip_share:  # drawn only when asked: older runs draw as before
            kw["slip"] = int(rng.choice([-2, -1, 1, 2]))
            kw["slip_at"] = int(rng.integers(0, tasks.MAX_TERMS))
        if self.recheck_share:
            kw["recheck"] = bool(rng.random() < self.recheck_share)
        return self.map(record, **kw)

    def map(self, record: dict, freeform: bool = False, **completion) -> dict:
        tok = self.tokenizer
        ex = tasks.as_example(record)
        if self.text:
            ids = [tok.bos_id] + tok.encode(ex["text"]) + [tok.eos_id]
            return {"tokens": np.asarray(ids, np.int32), "target_mask": np.ones(len(ids), np.int32)}
        prompt = [tok.bos_id] + tok.encode(TEMPLATES[self.template](ex["question"]))
        completion = tok.encode(tasks.sft_completion(ex, freeform, **completion)) + [tok.eos_id]
        ids = prompt + completion
        if len(ids) > self.seq_len:
            raise DataError(
                f"an example is {len(ids)} tokens ({len(prompt)} prompt + {len(completion)} completion), longer than "
                f"data.seq_len={self.seq_len}: raise data.seq_len, or use a shorter data.template "
                f"(question: {ex['question'][:80]!r})")
        mask = np.ones(len(ids), np.int32)
        if self.mode == "sft":
            mask[:len(prompt)] = 0
        return {"tokens": np.asarray(ids, np.int32), "target_mask": mask}


class Chunk(grain.experimental.FlatMapTransform):
    """Splits a long document into pieces of at most `seq_len` tokens (packing needs each piece to fit a row)."""

    def __init__(self, seq_len: int, max_pieces: int = 1 << 16):
        self.seq_len = seq_len
        self.max_fan_out = max_pieces

    def flat_map(self, element: dict):
        n = len(element["tokens"])
        if n > self.seq_len * self.max_fan_out:
            raise DataError(f"a document of {n} tokens is over {self.max_fan_out} rows of data.seq_len={self.seq_len}")
        return [{k: v[s:s + self.seq_len] for k, v in element.items()} for s in range(0, n, self.seq_len)]


class Rename(grain.transforms.Map):
    """Grain's packed field names -> the train step's `Batch` fields."""

    def map(self, x: dict) -> dict:
        return {"tokens": x["tokens"], "segment_ids": x["tokens_segment_ids"], "positions": x["tokens_positions"],
                "target_mask": x["target_mask"]}


def dataset(data_cfg: Any, tokenizer, source, local_batch: int, process_index: int = 0,
            process_count: int = 1) -> grain.IterDataset:
    """The whole pipeline for one host as a Grain IterDataset of batches (see the module docstring)."""
    if local_batch <= 0:
        raise ValueError(f"local batch {local_batch}: must be positive")
    if len(source) == 0:
        raise DataError(f"data.source={data_cfg.source!r}, split {data_cfg.split!r}: the dataset is empty")
    text = data_cfg.source == "text"
    T = data_cfg.seq_len
    ds = grain.MapDataset.source(source).shuffle(seed=data_cfg.seed).repeat(None)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.random_map(Tokenize(tokenizer, data_cfg.mode, data_cfg.template, T, text,
                                getattr(data_cfg, "freeform_share", 0.0), getattr(data_cfg, "slip_share", 0.0),
                                getattr(data_cfg, "recheck_share", 0.0)), seed=data_cfg.seed)
    it = ds.to_iter_dataset()
    if text:
        it = grain.experimental.FlatMapIterDataset(it, Chunk(T))
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": T, "target_mask": T}, num_packing_bins=local_batch, shuffle_bins=False)
    it = it.map(Rename()).batch(local_batch, drop_remainder=True)
    if data_cfg.worker_count > 0:
        _absl_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return it


def make_iterator(data_cfg: Any, tokenizer, source, local_batch: int, process_index: int = 0,
                  process_count: int = 1, state: Optional[dict] = None):
    """A `grain.DatasetIterator` over `dataset(...)`, set to `state` (from `get_state()`) when given."""
    it = iter(dataset(data_cfg, tokenizer, source, local_batch, process_index, process_count))
    if state is not None:
        it.set_state(state)
    return it


def prompt_iterator(data_cfg: Any, source, state: Optional[dict] = None):
    """Records of `source` (question/answer tasks) one at a time, in the seeded order of `dataset` (shuffled by
    data.seed, reshuffled each epoch), as a checkpointable `grain.DatasetIterator`. GRPO reads its prompts here;
    every host reads the same order (the prompts of a step are few and every host scores all rollouts)."""
    if len(source) == 0:
        raise DataError(f"data.source={data_cfg.source!r}, split {data_cfg.split!r}: the dataset is empty")
    it = iter(grain.MapDataset.source(source).shuffle(seed=data_cfg.seed).repeat(None).to_iter_dataset())
    if state is not None:
        it.set_state(state)
    return it


def _absl_parsed() -> None:
    """Grain's worker processes read absl flags; a program that never ran absl.app must mark them parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def fingerprint(batch: dict) -> str:
    """A short hash of a batch's contents (the data order check of exact resume)."""
    h = hashlib.sha256()
    for k in FIELDS:
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


__all__ = ["dataset", "make_iterator", "prompt_iterator", "Tokenize", "Chunk", "fingerprint", "FIELDS"]
