"""`deepjax sample`: completions of prompts from the command line or a file, streamed to the terminal.

    deepjax sample runs/tiny --prompt "What is 2 + 3?" --temperature 0
    deepjax sample path/to/DeepSeek-R1-Distill --prompts-file prompts.jsonl --template chat --max-new-tokens 512

SOURCE is a `deepjax train` / `grpo` run directory (config.json + checkpoints/; read by `deepjax/cli.py` with
`train.run.load_params`, since the infer layer does not import train) or an HF checkpoint directory (config.json +
*.safetensors + tokenizer.json, read here with `deepjax/model/hf.py`). The model runs on one device, outside any
mesh: `sampling.generate`'s one-device path (fused decode weights, Pallas kernels on GPU).

Streaming. `sampling.jit_generate` runs the whole generation in one `lax.while_loop`, so nothing leaves the device
before the end. `generate_rows` takes the same steps from a Python loop over two compiled functions (`_Plan`) built
from `sampling`'s public pieces in `sampling.generate`'s order: prepare (decode weights fused or unstacked once,
prefill, first token) and step (`sampling.decode_step` + `sampling.sample`), with the same key splits, so it returns
`generate`'s tokens for the same prompts, key and config (tests/test_sample.py). The host reads each step's tokens
while the device runs the next step. `TextStream` turns the tokens into text as they come: a piece is printed once
it decodes to whole characters, and for byte-level tokenizers the pieces join to the final text exactly.

One prompt streams; several print each completion when its row finishes (EOS or --max-new-tokens), in rows of
--batch per generate call. The last line of stdout is `N tokens in S s (T tokens/s)`: new tokens (EOS included)
over the wall time of prefill + decode, compilation excluded (reported on stderr).

Templates (`--template`): r1 / plain (`data/tokenizer.TEMPLATES`), chat (the checkpoint's `chat_template`, from
tokenizer_config.json or chat_template.jinja, rendered with jinja2 when it is installed) or none (the prompt as
is); each prompt starts with BOS. Default: a run's `data.template`; for an HF checkpoint chat when it has a chat
template, else none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax import model as M
from deepjax import paths
from deepjax.data.tokenizer import TEMPLATES, load_tokenizer
from deepjax.infer import sampling as SP
from deepjax.infer import text
from deepjax.model import hf
from deepjax.model.config import ModelConfig
from deepjax.schema import ConfigError, hints, parse_scalar, unwrap_optional

TEMPLATE_CHOICES = (*TEMPLATES, "chat", "none")
# SamplingConfig fields settable with --config.sampling.FIELD=VALUE; the others have their own flag, come from the
# tokenizer (eos_ids, pad_id), or are not supported by the streaming loop (mtp_draft, kernel_set).
SAMPLING_OVERRIDES = ("decoder", "cache_len", "unstack_layers")
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                  "top_k": "--top-k"}


# ---- the command line ------------------------------------------------------------------------------------------

def _number(kind, test: Callable, why: str):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}")
        if not test(v):
            raise argparse.ArgumentTypeError(f"{why}, got {s}")
        return v
    return parse


def _one_line_error(message: str):
    """argparse's errors as one line (`deepjax: error: ...`, status 2), without the usage lines."""
    print(f"deepjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sample` subcommand's arguments (`deepjax/cli.py` makes the subparser and reads SOURCE)."""
    p.error = _one_line_error
    p.add_argument("source", help="a `deepjax train` / `grpo` run directory, or an HF checkpoint directory "
                                  "(config.json + *.safetensors + tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="F", help="one prompt per line, or JSON lines with a \"prompt\" "
                                                      "string; - reads stdin")
    p.add_argument("--max-new-tokens", type=_number(int, lambda v: v > 0, "must be positive"), default=128,
                   metavar="N", help="default 128")
    p.add_argument("--temperature", type=_number(float, lambda v: v >= 0, "must be >= 0 (0: greedy)"),
                   default=0.6, metavar="T", help="0: greedy (default 0.6, as R1)")
    p.add_argument("--top-p", type=_number(float, lambda v: 0 < v <= 1, "must be in (0, 1]"), default=0.95,
                   metavar="P", help="nucleus sampling, 1: off (default 0.95, as R1)")
    p.add_argument("--top-k", type=_number(int, lambda v: v >= 0, "must be >= 0 (0: off)"), default=0,
                   metavar="K", help="keep the k most likely tokens, 0: off (default)")
    p.add_argument("--seed", type=_number(int, lambda v: v >= 0, "must be >= 0"), default=0, metavar="S",
                   help="default 0")
    p.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                   help="prompt template (default: the run's data.template; for an HF checkpoint chat when it "
                        "has a chat template, else none)")
    p.add_argument("--tokenizer", metavar="SPEC", default=None,
                   help="byte, a tokenizer.json or its directory (default: the run's data.tokenizer, or SOURCE's "
                        "tokenizer.json)")
    p.add_argument("--step", type=_number(int, lambda v: v >= 0, "must be >= 0"), default=None,
                   metavar="N", help="a run's checkpoint step (default: the newest)")
    p.add_argument("--batch", type=_number(int, lambda v: v > 0, "must be positive"), default=32,
                   metavar="B", help="rows per generate call when there are several prompts (default 32)")


def read_prompts(prompts: Sequence[str], path: Optional[str]) -> list[str]:
    """--prompt values, then the prompts of --prompts-file: a line starting with `{` is a JSON object with a
    "prompt" string, any other non-blank line is a prompt as it stands."""
    out = list(prompts)
    if path is not None:
        name = "stdin" if path == "-" else path
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--prompts-file {path}: no such file")
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        found = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise ValueError(f'{name}:{n}: a JSON line needs a "prompt" string')
                line = rec["prompt"]
            found.append(line)
        if not found:
            raise ValueError(f"--prompts-file {name}: no prompts in it")
        out += found
    if not out:
        raise ValueError("no prompt: give --prompt TEXT or --prompts-file F")
    if any(not p for p in out):
        raise ValueError("--prompt: an empty prompt")
    return out


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                    overrides: Sequence[str] = ()) -> SP.SamplingConfig:
    """The SamplingConfig of the flags, with `--config.sampling.FIELD=VALUE` for SAMPLING_OVERRIDES."""
    sc = SP.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    types = hints(SP.SamplingConfig)
    for item in overrides:
        key, eq, raw = item.removeprefix("--").partition("=")
        field = key.removeprefix("config.sampling.")
        if not eq:
            raise ConfigError(f"{item}: an override must look like --config.sampling.FIELD=VALUE")
        if field in SAMPLING_FLAGS:
            raise ConfigError(f"{key}: set it with {SAMPLING_FLAGS[field]}")
        if field not in SAMPLING_OVERRIDES:
            raise ConfigError(f"{key}: not settable in `deepjax sample`; settable: {', '.join(SAMPLING_OVERRIDES)}")
        tp, optional = unwrap_optional(types[field])
        value = None if optional and raw.strip().lower() in ("none", "null") else parse_scalar(tp, raw, key)
        sc = dataclasses.replace(sc, **{field: value})  # validates: errors name `sampling.FIELD=value`
    return sc


# ---- sources ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """A loaded model with its tokenizer, and where it came from."""

    path: str
    kind: str  # "run" | "hf"
    model: ModelConfig
    graphdef: object
    params: object
    tokenizer: object
    template: str  # the default template of this source
    chat_dir: Optional[str]  # where a chat template is looked up (the tokenizer's directory)
    step: Optional[int] = None  # a run's checkpoint step


def source_kind(path: str) -> str:
    """"run" (config.json + checkpoints/) or "hf" (config.json + *.safetensors); anything else is an error. A run
    directory may be a gs:// URI (deepjax/paths.py); an HF checkpoint directory is read with local file I/O."""
    if paths.is_remote(path):
        paths.check(path, "SOURCE")
        p = paths.Path(path)
        if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
            return "run"
        raise ValueError(f"{path}: not a deepjax run directory (config.json + checkpoints/); an HF checkpoint "
                         "directory must be on a local (or mounted) file system")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (SOURCE is a run directory or an HF checkpoint directory)")
    if os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isdir(os.path.join(path, "checkpoints")):
            return "run"
        if any(f.endswith(".safetensors") for f in os.listdir(path)):
            return "hf"
    raise ValueError(f"{path}: neither a deepjax run directory (config.json + checkpoints/) nor an HF checkpoint "
                     "directory (config.json + *.safetensors)")


def tokenizer_of(spec: str, where: str):
    """`data/tokenizer.load_tokenizer(spec)`, with the missing file named with `where` it came from."""
    path = os.path.expanduser(spec)
    if spec != "byte":
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer file ({where}; give --tokenizer byte|PATH)")
    return load_tokenizer(spec)


def chat_dir_of(tokenizer) -> Optional[str]:
    path = getattr(tokenizer, "path", None)  # HFTokenizer: its tokenizer.json; the byte tokenizer has none
    return os.path.dirname(path) if path else None


def check_vocab(model: ModelConfig, tokenizer, path: str) -> None:
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} of {path}: smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids, {tokenizer!r})")


def hf_source(path: str, tokenizer: Optional[str] = None) -> Source:
    """An HF checkpoint directory, weights not read yet (`load_hf_weights`): its config.json, the tokenizer
    (--tokenizer, else its tokenizer.json) and the default template (chat when there is a chat template: the
    tokenizer's directory's, else the checkpoint's)."""
    tok = tokenizer_of(tokenizer or path, "--tokenizer" if tokenizer else "the checkpoint's tokenizer")
    try:
        cfg = ModelConfig.from_hf(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/config.json: not valid JSON ({e.msg})") from None
    check_vocab(cfg, tok, path)
    chat = chat_dir_of(tok) or path  # the byte tokenizer has no directory: the checkpoint's chat template
    template = "chat" if find_chat_template(chat) is not None else "none"
    return Source(path, "hf", cfg, None, None, tok, template, chat)


def load_hf_weights(src: Source) -> Source:
    """`src` with its weights (`deepjax/model/hf.py`, on the default device; the config as `hf.load` reads it)."""
    cfg, graphdef, params = hf.load(src.path)
    return dataclasses.replace(src, model=cfg, graphdef=graphdef, params=params)


def with_model_config(src: Source, cfg: ModelConfig) -> Source:
    """`src` under a model config changed by `--config.model.FIELD=VALUE` overrides: only fields that leave the
    parameters' tree and shapes as they are (dtype, kernels, routing constants, ...); param_dtype casts them."""
    if cfg == src.model:
        return src
    changed = [f.name for f in dataclasses.fields(ModelConfig) if getattr(cfg, f.name) != getattr(src.model, f.name)]
    graphdef, abstract = M.abstract_init(cfg)
    want = {tuple(p): v.shape for p, v in nnx.to_flat_state(abstract)}
    have = {tuple(p): v.shape for p, v in nnx.to_flat_state(src.params)}
    if want != have:
        raise ConfigError(f"model.{changed[0]}={getattr(cfg, changed[0])!r}: changes the parameters' shapes; a "
                          "checkpoint's are fixed (fields such as model.dtype or model.param_dtype can change)")
    params = jax.tree.map(lambda x, a: x.astype(a.dtype), src.params, abstract)
    return dataclasses.replace(src, model=cfg, graphdef=graphdef, params=params)


# ---- prompts ---------------------------------------------------------------------------------------------------

def find_chat_template(directory: str) -> Optional[str]:
    """The chat template of a checkpoint directory: tokenizer_config.json's `chat_template` (a string, or a list of
    {name, template} where the one named "default" is taken), else a chat_template.jinja file; None if neither."""
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"could not read {path}: {e}") from None
        tpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(tpl, list):
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(tpl, str):
            return tpl
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def _token_text(tokenizer, token_id: int) -> str:
    return next((t for t, i in tokenizer.special_ids.items() if i == token_id), "")


def render_chat(template: str, prompt: str, tokenizer, where: str) -> str:
    """One user message rendered with the chat template as transformers' `apply_chat_template` does (sandboxed
    jinja2, trim_blocks / lstrip_blocks, add_generation_prompt=True, bos_token / eos_token)."""
    try:
        import jinja2  # lazy on purpose: an optional dependency (transformers brings it), for --template chat only
        from jinja2 import ext, sandbox  # lazy on purpose: as above
    except ImportError:
        raise ValueError("--template chat: rendering a chat template needs jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=_token_text(tokenizer, tokenizer.bos_id), eos_token=_token_text(tokenizer, tokenizer.eos_id))
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template of {where}: {e}") from None


def prompt_ids(tokenizer, template: str, prompts: Sequence[str], chat_dir: Optional[str]) -> list[list[int]]:
    """Each prompt in `template` (TEMPLATE_CHOICES) as token ids, BOS first (a chat template that writes BOS itself
    gets no second one)."""
    if template in TEMPLATES:
        return text.prompt_ids(tokenizer, template, prompts)
    if template == "none":
        return [tokenizer.encode(p, add_bos=True) for p in prompts]
    tpl = find_chat_template(chat_dir) if chat_dir else None
    if tpl is None:
        where = chat_dir or f"the tokenizer {tokenizer!r}"
        raise ValueError(f"--template chat: no chat_template in {where} (tokenizer_config.json or "
                         "chat_template.jinja); use --template r1|plain|none")
    bos = _token_text(tokenizer, tokenizer.bos_id)
    out = []
    for p in prompts:
        s = render_chat(tpl, p, tokenizer, chat_dir)
        out.append(tokenizer.encode(s, add_bos=not (bos and s.startswith(bos))))
    return out


def encode(src: Source, prompts: Sequence[str], template: Optional[str], sc: SP.SamplingConfig):
    """(src with the template chosen, prompt ids, sc with the tokenizer's EOS and pad): every check that needs no
    weights, so that a bad template or cache length fails before a checkpoint is read."""
    src = dataclasses.replace(src, template=template or src.template)
    ids = prompt_ids(src.tokenizer, src.template, prompts, src.chat_dir)
    sc = dataclasses.replace(sc, eos_ids=(src.tokenizer.eos_id,), pad_id=src.tokenizer.pad_id)
    SP.cache_length(sc, max(len(p) for p in ids))  # a too short sampling.cache_len
    return src, ids, sc


# ---- the streaming generator -----------------------------------------------------------------------------------

def _split_layers(layers):
    """(array leaves, (treedef, the other leaves)) of the decode layers (`sampling.fuse_layers` dicts hold static
    entries: the config, kernel choices), so the arrays can leave one jitted function and enter another."""
    leaves, treedef = jax.tree.flatten(layers)
    arrays = [x for x in leaves if isinstance(x, jax.Array)]
    static = [None if isinstance(x, jax.Array) else x for x in leaves]
    return arrays, (treedef, static)


def _join_layers(arrays, static):
    treedef, leaves = static
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if x is None else x for x in leaves])


class _Plan:
    """`sampling.generate`'s two halves, compiled for one (graphdef, config, batch, prompt length)."""

    def __init__(self, graphdef, sc: SP.SamplingConfig, params, prompts_BP, lengths_B, key):
        self.static = None

        def prepare(params, prompts_BP, lengths_B, key):  # generate up to its while_loop
            model = nnx.merge(graphdef, params)
            layers, cache, tok, lp, key, _, _ = SP.start(model, prompts_BP, lengths_B, key, sc)
            arrays, self.static = _split_layers(layers)
            return arrays, cache, tok, lp, key

        def step(params, arrays, cache, tok, lengths_B, i, key):  # generate's loop body: token i in, i + 1 out
            model = nnx.merge(graphdef, params)
            layers = _join_layers(arrays, self.static)
            return SP.advance(model, layers, tok, lengths_B.astype(jnp.int32) + i, cache, key, sc)[:4]

        t = time.perf_counter()
        options = SP.compiler_options(jax.default_backend(), True, prompts_BP.shape[0])  # as jit_generate's
        lowered = jax.jit(prepare).lower(params, prompts_BP, lengths_B, key)  # traced first: it sets self.static
        arrays, cache, tok, _, key = lowered.out_info
        self.prepare = lowered.compile(options)
        self.step = jax.jit(step, donate_argnums=2).lower(params, arrays, cache, tok, lengths_B, np.int32(0),
                                                          key).compile(options)
        self.compile_s = time.perf_counter() - t


_PLANS: dict = {}


def plan(graphdef, params, prompts_BP, lengths_B, key, sc: SP.SamplingConfig) -> tuple[_Plan, bool]:
    """(the compiled `_Plan` for these shapes and config, whether it was compiled now): compiled once, then cached."""
    spec = (graphdef, sc, prompts_BP.shape, str(jax.tree.structure(params)),
            tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(params)))
    fresh = spec not in _PLANS
    if fresh:
        _PLANS[spec] = _Plan(graphdef, sc, params, prompts_BP, lengths_B, key)
    return _PLANS[spec], fresh


def generate_rows(graphdef, params, prompts_BP, lengths_B, key, sc: SP.SamplingConfig,
                  on_step: Optional[Callable] = None) -> SP.Output:
    """`sampling.generate`'s output (host arrays) for the same arguments, from a Python loop over jitted steps.
    After each step, `on_step(i, tokens_B, active_B, done_B)`: token i of every row, the rows that took it (not
    stopped before), and the rows stopped now (EOS taken)."""
    prompts_BP, lengths_B = np.asarray(prompts_BP, np.int32), np.asarray(lengths_B, np.int32)
    p = plan(graphdef, params, prompts_BP, lengths_B, key, sc)[0]
    B, N = prompts_BP.shape[0], sc.max_new_tokens
    arrays, cache, tok, lp, key = p.prepare(params, prompts_BP, lengths_B, key)
    out_tok = np.full((B, N), sc.pad_id, np.int32)
    out_lp = np.zeros((B, N), np.float32)
    done = np.zeros(B, bool)
    n_new = np.zeros(B, np.int32)
    eos = np.asarray(sc.eos_ids, np.int32)
    for i in range(N):
        # the next step is queued before this one's tokens are read: the device runs while the host prints
        nxt = p.step(params, arrays, cache, tok, lengths_B, np.int32(i), key) if i + 1 < N else None
        t, l = np.asarray(tok), np.asarray(lp)
        active = ~done
        out_tok[active, i], out_lp[active, i] = t[active], l[active]
        n_new += active
        done = done | (active & np.isin(t, eos))
        if on_step is not None:
            on_step(i, t, active, done)
        if nxt is None or done.all():
            break
        tok, lp, cache, key = nxt
    return SP.Output(out_tok, out_lp, n_new, done)


class TextStream:
    """Incremental decoding of one row: `push(ids)` returns the text that the new tokens completed ("" while they
    end inside a character), `flush()` the rest. Each decode covers the tokens from the previous piece's start (the
    context a tokenizer may need, e.g. for a leading space), and the new piece is what it adds to the previous
    piece's text; for the byte tokenizer and byte-level BPE (DeepSeek's) the pieces join to the decode of all the
    ids exactly (tests/test_sample.py)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = self.read = 0  # the previous piece covered ids[start:read]

    def _text(self, a: int, b: int) -> str:
        return self.tokenizer.decode(self.ids[a:b], errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        before, now = self._text(self.start, self.read), self._text(self.start, len(self.ids))
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        before, now = self._text(self.start, self.read), self._text(self.start, len(self.ids))
        self.start = self.read = len(self.ids)
        return now[len(before):]


# ---- the command -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    texts: list[str]
    tokens: int  # new tokens, EOS included
    seconds: float  # prefill + decode, compilation excluded
    compile_seconds: float


def _title(i: int, n: int, prompt: str) -> str:
    lines = prompt.strip().splitlines() or [""]
    more = len(lines[0]) > 70 or len(lines) > 1
    return f"=== {i + 1}/{n}: {lines[0][:70]}{'...' if more else ''}"


def run(src: Source, prompts: Sequence[str], ids: Sequence[Sequence[int]], sc: SP.SamplingConfig, seed: int = 0,
        batch: int = 32, out: Optional[TextIO] = None, log: Optional[TextIO] = None) -> Result:
    """Samples a completion of each prompt (`ids`, `sc`: from `encode`) and prints it to `out` (default stdout): one
    prompt streamed as it is decoded, several each when its row finishes; then `N tokens in S s (T tokens/s)`.
    Batch c of rows draws from key(seed) (c = 0) or fold_in(key(seed), c). Notes go to `log` (default stderr)."""
    out, log = out or sys.stdout, log or sys.stderr
    tok = src.tokenizer
    n = len(ids)
    rows = min(batch, n)
    pad_to = -(-max(len(p) for p in ids) // 16) * 16  # one prompt length for every batch: one compilation
    print(f"{src.kind} {src.path}{f' step {src.step}' if src.step is not None else ''}: "
          f"{M.count_params(src.params):,} parameters; template {src.template}; {n} prompt(s), "
          f"temperature {sc.temperature}, top-p {sc.top_p}, top-k {sc.top_k}, max {sc.max_new_tokens} new tokens",
          file=log, flush=True)
    texts: list[Optional[str]] = [None] * n
    total = 0
    seconds = compile_s = 0.0
    root = jax.random.key(seed)
    for c, start in enumerate(range(0, n, rows)):
        chunk = ids[start:start + rows]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (rows - real)
        P, L = SP.pad_prompts(chunk, pad_id=tok.pad_id, multiple=pad_to)
        key = root if c == 0 else jax.random.fold_in(root, c)
        compiled, fresh = plan(src.graphdef, src.params, P, L, key, sc)
        if fresh:
            print(f"compiled in {compiled.compile_s:.1f} s", file=log, flush=True)
            compile_s += compiled.compile_s
        streams = [TextStream(tok) for _ in range(real)]
        pieces: list[list[str]] = [[] for _ in range(real)]

        def on_step(i, t, active, done):
            last = i + 1 == sc.max_new_tokens
            for r in np.flatnonzero(active[:real]):
                s = streams[r]  # an EOS ends the text and is not part of it
                piece = s.flush() if done[r] else s.push([t[r]]) + (s.flush() if last else "")
                pieces[r].append(piece)
                if n == 1:
                    out.write(piece)
                    out.flush()
                elif done[r] or last:
                    texts[start + r] = "".join(pieces[r])
                    print(_title(start + r, n, prompts[start + r]), file=out)
                    print(texts[start + r], file=out, flush=True)

        t0 = time.perf_counter()
        res = generate_rows(src.graphdef, src.params, P, L, key, sc, on_step)
        seconds += time.perf_counter() - t0
        total += int(res.lengths[:real].sum())
        if n == 1:
            texts[0] = "".join(pieces[0])
            out.write("\n")
    rate = total / seconds if seconds > 0 else float("inf")
    print(f"{total} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)", file=out, flush=True)
    return Result([t or "" for t in texts], total, seconds, compile_s)


__all__ = ["add_arguments", "read_prompts", "sampling_config", "Source", "source_kind", "tokenizer_of",
           "chat_dir_of", "check_vocab", "hf_source", "load_hf_weights", "with_model_config", "find_chat_template",
           "render_chat", "prompt_ids", "encode", "generate_rows", "TextStream", "plan", "run", "Result",
           "TEMPLATE_CHOICES", "SAMPLING_OVERRIDES"]
