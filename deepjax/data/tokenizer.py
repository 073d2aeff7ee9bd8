"""Tokenizers (a built-in byte tokenizer, or an HF tokenizer.json) and the prompt templates.

    tok = load_tokenizer("byte")                 # or "path/to/tokenizer.json", or a directory holding one
    ids = tok.encode(r1_prompt("Compute 2 + 2"), add_bos=True)
    tok.decode(ids)                              # "<bos>A conversation between User and Assistant. ..."

Both tokenizers share one interface: `encode(text, add_bos=False) -> list[int]`, `decode(ids) -> str`, and the
properties `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `special_ids` ({token text: id}). Neither adds BOS/EOS on its
own: the data pipeline places them (deepjax/data/pipeline.py).

`ByteTokenizer`: ids 0..255 are the UTF-8 bytes, then 7 special tokens (`SPECIALS`); the literal text of a special
token in the input encodes to its single id, and invalid UTF-8 decodes with U+FFFD.

`tokenizers` is imported only when an HF file is loaded, so this module imports without it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from typing import Iterable, Optional, Sequence

from deepjax.errors import TokenizerError, TokenizerFileNotFoundError

_REPLACEMENT = "\ufffd".encode()  # what an id outside the vocabulary decodes to (errors="replace")
SPECIALS = ("<bos>", "<eos>", "<pad>", "<think>", "</think>", "<answer>", "</answer>")

# DeepSeek-R1 paper, Table 1 (docs/deepseek.md, R1): the R1-Zero template, in full.
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"

# Names under which tokenizer.json files carry BOS / EOS / PAD, most specific first (DeepSeek uses full-width bars).
BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]")
PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")


def r1_prompt(question: str) -> str:
    """The R1-Zero prompt: `R1_TEMPLATE` with `{prompt}` = the question (the template adds the final ". Assistant:")."""
    return R1_TEMPLATE.format(prompt=question)


def plain_prompt(question: str) -> str:
    """`"Question: {question}\\nAnswer:"`."""
    return PLAIN_TEMPLATE.format(prompt=question)


TEMPLATES = {"r1": r1_prompt, "plain": plain_prompt}


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus `SPECIALS` (ids 256..262)."""

    def __init__(self):
        self._special_ids = {s: 256 + i for i, s in enumerate(SPECIALS)}
        self._special_text = {i: s for s, i in self._special_ids.items()}
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    @property
    def bos_id(self) -> int:
        return self._special_ids["<bos>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["<eos>"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["<pad>"]

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for piece in self._split_re.split(text):  # odd indices are the specials matched by the group
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], errors: str = "strict") -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). An id outside the vocabulary raises, or with
        errors="replace" becomes U+FFFD: a model's vocab_size is usually larger than the tokenizer's, and a
        sampler can draw the spare ids (`sampled_text`).
        One UTF-8 decode of the bytes with each special's text and each spare id's U+FFFD spliced in as UTF-8: the
        same text as decoding the byte runs between them apart (a spliced sequence starts with an ASCII or a lead
        byte, so it never completes a truncated sequence before it; tests/test_data.py), without a Python step per
        id (a GRPO rollout of 512 random-weight rows: 0.11 s of its host time, docs/LOG.md session 24)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy rows: one conversion
        if errors != "replace" and ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the byte vocabulary (size {self.vocab_size})")
        raw = b"".join(map(self._pieces.get, ids, itertools.repeat(_REPLACEMENT)))
        return raw.decode("utf-8", errors="replace")

    @functools.cached_property
    def _pieces(self) -> dict[int, bytes]:
        """The bytes each id decodes to: itself for 0..255, a special's text."""
        return {**{i: bytes([i]) for i in range(256)}, **{i: s.encode() for i, s in self._special_text.items()}}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """An HF `tokenizer.json` through the `tokenizers` library, with the `ByteTokenizer` interface.

    BOS / EOS / PAD: from a `tokenizer_config.json` next to the file when it names them, else the first of
    `BOS_NAMES` / `EOS_NAMES` / `PAD_NAMES` in the vocabulary. A missing BOS or EOS is an error; PAD falls back to EOS.
    Pickles as its path (Grain worker processes reload the file).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._tok = _load_hf(self.path)
        cfg = _tokenizer_config(os.path.dirname(self.path))
        self._bos = self._find("bos", cfg, BOS_NAMES, required=True)
        self._eos = self._find("eos", cfg, EOS_NAMES, required=True)
        self._pad = self._find("pad", cfg, PAD_NAMES, required=False)
        if self._pad is None:
            self._pad = self._eos

    def _find(self, role: str, cfg: dict, names: Sequence[str], required: bool) -> Optional[int]:
        named = cfg.get(f"{role}_token")
        if isinstance(named, dict):  # {"content": "<s>", ...} in older files
            named = named.get("content")
        tried = ([named] if named else []) + list(names)
        for name in tried:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        if required:
            raise TokenizerError(f"{self.path}: no {role.upper()} token found (tried {tried}); "
                                 f"add one to the tokenizer, or name it as {role}_token in tokenizer_config.json")
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def special_ids(self) -> dict[str, int]:
        out = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for i in (self._bos, self._eos, self._pad):
            out[self._tok.id_to_token(i)] = i
        return out

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], errors: str = "strict") -> str:
        """Text of `ids`; with errors="replace" an id outside the vocabulary becomes U+FFFD (else it raises)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if not bad:
            return self._tok.decode(ids, skip_special_tokens=False)
        if errors != "replace":
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.path} (size {self.vocab_size})")
        out, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                out += [self._tok.decode(run, skip_special_tokens=False), "\ufffd"]
                run = []
        return "".join(out) + self._tok.decode(run, skip_special_tokens=False)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def _load_hf(path: str):
    if not os.path.isfile(path):
        raise TokenizerFileNotFoundError(f"tokenizer file not found: {path}")
    import tokenizers  # lazy on purpose: this module (prompt templates) loads with the standard library only

    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise TokenizerError(f"could not read tokenizer file {path}: {e}") from e


def _tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"could not read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> ByteTokenizer; else a tokenizer.json path, or a directory that holds one (`data.tokenizer`)."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return HFTokenizer(path)


__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "r1_prompt", "plain_prompt", "TEMPLATES", "R1_TEMPLATE",
           "PLAIN_TEMPLATE", "SPECIALS"]
