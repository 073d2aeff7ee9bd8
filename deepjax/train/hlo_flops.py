"""Loop-aware matmul FLOPs of a compiled XLA program, read from its optimized HLO text.

XLA's `compiled.cost_analysis()["flops"]` counts each `while` body once, however many times it runs (a 10-step
`lax.scan` of matmuls reports 1/10 of the work), and a custom kernel (Pallas / Mosaic) only through the cost
estimate attached to it. deepjax's step is full of loops (scanned layers, blocked attention, micro-batches), so
that figure says little. This module walks the optimized HLO instead:

  dot            2 x prod(output dims) x prod(lhs contracting dims)
  convolution    2 x batch x output features x input features x the window taps that meet real input
  custom-call    a cuBLAS matmul (XLA:GPU) as a dot, from its gemm_backend_config's contracting dims; a sort
                 as 0; the `cost_estimate` flops in its backend config when present (Mosaic kernels carry the
                 `pl.CostEstimate` their author gave); otherwise `kernel_flops(name, operand types, output types)`
                 from the caller, a type being (dtype, dims) and the name the kernel's (the jax name before its
                 pallas_call, or before mpmd_map for a Mosaic GPU kernel), else counted as 0 and listed in
                 `uncounted`
  while          its body x `known_trip_count` (XLA annotates counted loops); an unknown trip count is counted
                 once and listed in `unknown_loops`
  conditional    the most expensive branch
  fusion / call  the called computation

Only matmul-like work is counted (the PaLM / MFU convention the model's FLOPs use); elementwise work is not.
`bytes` is the memory traffic the same way: operands and results of every instruction outside fusion bodies
(a fusion counts its own operands and result), times the trip counts of its loops.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|f8e4m3b11fnuz|f8e4m3fnuz|f8e5m2fnuz|"
                    r"bf16|f16|f32|f64|c64|c128|token)\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclass
class Instr:
    name: str
    shape: str  # the result type text
    opcode: str
    operands: list  # operand texts
    attrs: str  # everything after the operand list
    root: bool = False  # the computation's ROOT


@dataclass
class Flops:
    total: float = 0.0
    by_kind: dict = field(default_factory=dict)  # dot / convolution / custom-call -> FLOPs
    loops: list = field(default_factory=list)  # (while name, trip count) in order of first visit
    unknown_loops: list = field(default_factory=list)  # no trip count found: counted once
    derived_loops: list = field(default_factory=list)  # trip count read from the loop condition (TPU programs)
    uncounted: list = field(default_factory=list)  # custom calls without an estimate or a kernel_flops figure
    kernels: dict = field(default_factory=dict)  # custom-call target / kernel name -> FLOPs
    bytes: float = 0.0  # HBM traffic: operands + results of every unfused instruction / fusion, loop-aware
    by_source: dict = field(default_factory=dict)  # the op's jax source (metadata op_name) -> FLOPs
    bytes_by_source: dict = field(default_factory=dict)  # the same -> memory traffic


def types(type_text: str) -> list[tuple[str, list[int]]]:
    """Every array type in a type text, e.g. '(f32[2,3]{1,0}, s32[])' -> [('f32', [2, 3]), ('s32', [])]."""
    return [(m.group(1), [int(d) for d in m.group(2).split(",") if d]) for m in _SHAPE.finditer(type_text)]


def dims(type_text: str) -> list[list[int]]:
    """Every array shape in a type text, e.g. '(f32[2,3]{1,0}, s32[])' -> [[2, 3], []]."""
    return [[int(d) for d in m.group(2).split(",") if d] for m in _SHAPE.finditer(type_text)]


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_instr(rest: str) -> Optional[tuple[str, str, list, str]]:
    """'TYPE opcode(operands), attrs' -> (TYPE, opcode, operands, attrs)."""
    i = 0
    if rest.startswith("("):  # tuple type: balanced parentheses
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        i += 1
    else:
        while i < len(rest) and rest[i] != " ":
            i += 1
    type_text, rest = rest[:i], rest[i:].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    depth, j = 0, m.end() - 1
    for j in range(m.end() - 1, len(rest)):
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        if depth == 0:
            break
    return type_text, opcode, _split_top(rest[m.end():j]), rest[j + 1:]


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _logical_lines(hlo_text: str):
    """Lines, with an instruction whose attributes span several lines (TPU kernels' metadata) joined into one.
    Braces inside quoted strings do not count (GPU kernels carry their compiled module as an escaped string)."""
    buf, depth = [], 0
    for line in hlo_text.splitlines():
        buf.append(line)
        bare = _QUOTED.sub("", line) if '"' in line else line
        depth += bare.count("{") - bare.count("}")
        if depth <= 0 or line.endswith(" {") and len(buf) == 1:
            yield " ".join(buf)
            buf, depth = [], 0
    if buf:
        yield " ".join(buf)


def parse(hlo_text: str) -> tuple[dict, str]:
    """{computation name: [Instr]} and the entry computation's name."""
    comps, entry, cur = {}, None, None
    for line in _logical_lines(hlo_text):
        h = _COMP_HEADER.match(line)
        if h and "=" not in line.split("(")[0]:
            cur = h.group(2)
            comps[cur] = []
            if h.group(1):
                entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parsed = _parse_instr(m.group(3))
        if parsed:
            comps[cur].append(Instr(m.group(2), *parsed, root=bool(m.group(1))))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(attrs: str, key: str) -> Optional[str]:
    m = re.search(key + r"=\{?([^}\s,]*(?:,[^}\s,=]*)*)\}?", attrs)
    return m.group(1) if m else None


# custom calls that do no matmul work: XLA:GPU's CUB sort of the MoE's expert ids; XLA:TPU's buffer allocation and
# gather-bounds annotation
_NO_FLOP_TARGETS = ("cub_sort", "AllocateBuffer", "AssumeGatherIndicesInBound")


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", attrs)
    if m:
        return [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
    m = re.search(key + r"=%?([\w.\-]+)", attrs)
    return [m.group(1)] if m else []


def _backend_config(attrs: str) -> Optional[dict]:
    i = attrs.find("backend_config=")
    if i < 0:
        return None
    s = attrs[i + len("backend_config="):]
    if s.startswith('"'):  # escaped string form
        m = re.match(r'"((?:[^"\\]|\\.)*)"', s)
        if not m:
            return None
        s = m.group(1).encode().decode("unicode_escape")
    elif not s.startswith("{"):
        return None
    depth = 0
    for j, ch in enumerate(s):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            try:
                return json.loads(s[:j + 1])
            except ValueError:
                return None
    return None


def _source(op_name: str) -> str:
    """'jit(step)/transpose(jvp(Block))/while/body/attn/dot_general' -> 'bwd Block/attn/dot_general'."""
    bwd = "transpose(" in op_name
    parts = [p for p in re.split(r"[/()]", op_name) if p and p not in ("jvp", "transpose", "while", "body", "cond",
                                                                        "closed_call", "checkpoint", "remat")]
    parts = [p for p in parts if not p.startswith("jit") and not p.startswith("vmap")]
    return ("bwd " if bwd else "fwd ") + "/".join(parts[-3:])


def _conv_flops(attrs: str, lhs: list, rhs: list, out: list) -> float:
    """2 x batch x output features x input features x, per spatial dimension, the (output position, kernel tap)
    pairs that meet a real input element: XLA:TPU writes batched and multi-axis matmuls as convolutions whose
    extra dimensions are windows over padded or dilated inputs, where most taps meet padding."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not m or not lhs or not rhs:
        return 2.0 * math.prod(out) * (rhs[-2] if len(rhs) >= 2 else 1)
    lhs_l, rhs_l, out_l = m.groups()
    w = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in (w.group(1).split() if w else []) if "=" in kv)

    def per_dim(key, n, default):
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * n

    spatial = sorted(c for c in out_l if c.isdigit())
    n = len(spatial)
    size, stride = per_dim("size", n, 1), per_dim("stride", n, 1)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", n, 1), per_dim("rhs_dilate", n, 1)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * n
    pairs = 1.0
    for j, d in enumerate(spatial):
        n_in, n_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
        if n_out * size[j] > 4_000_000:  # too many to enumerate: every tap counts
            pairs *= n_out * size[j]
            continue
        o = np.arange(n_out)[:, None]
        t = np.arange(size[j])[None, :]
        pos = o * stride[j] + t * rhs_dil[j] - pads[j][0]
        pairs *= float(((pos >= 0) & (pos <= (n_in - 1) * lhs_dil[j]) & (pos % lhs_dil[j] == 0)).sum())
    batch, features = out[out_l.index("b")], out[out_l.index("f")]
    return 2.0 * batch * features * rhs[rhs_l.index("i")] * pairs


_NO_TRAFFIC = frozenset(("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional",
                         "call", "after-all", "partition-id", "replica-id", "copy-done", "async-done", "opt-barrier",
                         "fusion-done"))
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}


def _nbytes(ts: list) -> float:
    return sum(_BYTES.get(t, 1) * math.prod(d) for t, d in ts if t in _BYTES or t.startswith("f8"))


def _constant(instrs: list, name: str) -> Optional[int]:
    for i in instrs:
        if i.name == name.split()[-1].lstrip("%") and i.opcode == "constant":
            try:
                return int(i.operands[0])
            except (ValueError, IndexError):
                return None
    return None


def _trip_count_from_condition(comps: dict, cond: str, loop: Instr, caller: list) -> Optional[int]:
    """Trip count of a counted loop whose condition is `counter < N` (XLA:TPU does not annotate
    known_trip_count): N minus the counter's initial value (a constant in the loop's init tuple, else 0)."""
    instrs = comps.get(cond, [])
    root = instrs[-1] if instrs else None
    for i in instrs:  # the ROOT is the last instruction of a computation in XLA's printout, but be safe
        if i.opcode == "compare" and "direction=LT" in i.attrs:
            root = i
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    bound = _constant(instrs, root.operands[1])
    gte = next((i for i in instrs if i.name == root.operands[0].split()[-1].lstrip("%")), None)
    if bound is None or gte is None or gte.opcode != "get-tuple-element":
        return None
    index = int((re.search(r"index=(\d+)", gte.attrs) or [0, 0])[1])
    init = 0
    tup = next((i for i in caller if i.name == loop.operands[0].split()[-1].lstrip("%")), None)
    if tup is not None and tup.opcode == "tuple" and index < len(tup.operands):
        init = _constant(caller, tup.operands[index]) or 0
    return max(bound - init, 0)


KernelFlops = Callable[[str, list, list], Optional[float]]


def _operand_name(operand: str) -> str:
    return operand.split()[-1].lstrip("%")


def _traffic(ins: Instr, operand_bytes: list, comps: dict) -> float:
    """Bytes an unfused instruction (or a fusion, as a whole) reads and writes. A slice reads only its result's
    bytes of the sliced operand, and a dynamic-update-slice updates its buffer in place (reads and writes the
    update): counting whole operands there would charge a scanned layer's slice of the stacked weights as the
    whole stack, every trip. A fusion's operands and results get the same rule from its body: a parameter used
    only by slices counts what they read; a ROOT dynamic-update-slice (or a tuple of them) into a parameter counts
    the update, not the buffer."""
    out = _nbytes(types(ins.shape))
    if ins.opcode == "fusion-start":  # an async fusion: ((operands), result, context); its fusion-done moves nothing
        out = _nbytes(types(ins.shape)[len(operand_bytes):-1])
    ins_b = list(operand_bytes)
    if ins.opcode in ("slice", "dynamic-slice") and ins_b:
        ins_b[0] = out
    elif ins.opcode == "dynamic-update-slice" and len(ins_b) > 1:
        return 2 * ins_b[1] + sum(ins_b[2:])
    elif ins.opcode in ("fusion", "fusion-start"):
        body = comps.get((_called(ins.attrs, "calls") or [""])[0], [])
        params = {}
        for b in body:
            if b.opcode == "parameter":
                m = re.match(r"\s*(\d+)", b.operands[0] if b.operands else "")
                if m:
                    params[b.name] = int(m.group(1))
        users: dict = {}
        for b in body:
            for o in b.operands:
                users.setdefault(_operand_name(o), []).append(b)
        for pname, i in params.items():
            us = users.get(pname, [])
            if i < len(ins_b) and us and all(u.opcode in ("slice", "dynamic-slice")
                                             and _operand_name(u.operands[0]) == pname for u in us):
                ins_b[i] = sum(_nbytes(types(u.shape)) for u in us)
        by_name = {b.name: b for b in body}
        root = next((b for b in body if b.root), None)
        parts = [by_name.get(_operand_name(o)) for o in root.operands] if root and root.opcode == "tuple" else [root]
        for part in parts:
            if part is not None and part.opcode == "dynamic-update-slice":
                buf = _operand_name(part.operands[0])
                if buf in params and params[buf] < len(ins_b):
                    upd = by_name.get(_operand_name(part.operands[1]))
                    upd_b = _nbytes(types(upd.shape)) if upd is not None else 0.0
                    out += upd_b - _nbytes(types(part.shape))
                    ins_b[params[buf]] = upd_b if len(users.get(buf, [])) > 1 else 0.0
    return out + sum(ins_b)


def count(hlo_text: str, kernel_flops: Optional[KernelFlops] = None) -> Flops:
    """Matmul FLOPs of one run of the program (see the module docstring)."""
    comps, entry = parse(hlo_text)
    res = Flops()

    def type_of(comp_types: dict, operand: str) -> tuple[str, list[int]]:
        t = types(operand)
        if t:
            return t[0]
        return (comp_types.get(operand.split()[-1].lstrip("%")) or [("?", [])])[0]

    def shape_of(comp_shapes: dict, operand: str) -> list[int]:
        d = dims(operand)  # operands printed with their types
        if d:
            return d[0]
        name = operand.split()[-1].lstrip("%")
        return (comp_shapes.get(name) or [[]])[0]

    def add(kind: str, f: float, mult: float, ins: Instr):
        res.by_kind[kind] = res.by_kind.get(kind, 0.0) + f * mult
        m = re.search(r'op_name="([^"]*)"', ins.attrs)
        src = _source(m.group(1)) if m else "?"
        res.by_source[src] = res.by_source.get(src, 0.0) + f * mult

    def dot_flops(ins: Instr, contract: list, shapes: dict) -> float:
        """2 x prod(output dims) x prod(lhs contracting dims) (a custom call's output is its tuple's first)."""
        lhs = shape_of(shapes, ins.operands[0])
        return 2.0 * math.prod(dims(ins.shape)[0]) * math.prod(lhs[c] for c in contract)

    def comp_flops(name: str, mult: float, top: bool = True) -> float:
        """FLOPs of one execution of computation `name`; records kinds (and, for computations that are not fusion
        bodies, memory traffic) scaled by `mult` executions."""
        total = 0.0
        instrs = comps.get(name, [])
        shapes = {i.name: dims(i.shape) for i in instrs}
        typed = {i.name: types(i.shape) for i in instrs}
        for ins in instrs:
            op = ins.opcode
            if top and op not in _NO_TRAFFIC:
                b = mult * _traffic(ins, [_nbytes([type_of(typed, o)]) for o in ins.operands], comps)
                res.bytes += b
                m = re.search(r'op_name="([^"]*)"', ins.attrs)
                src = _source(m.group(1)) if m else op
                res.bytes_by_source[src] = res.bytes_by_source.get(src, 0.0) + b
            if op == "dot":
                contract = [int(c) for c in (_attr(ins.attrs, "lhs_contracting_dims") or "").split(",") if c]
                f = dot_flops(ins, contract, shapes)
                add("dot", f, mult, ins)
                total += f
            elif op == "convolution":
                out = dims(ins.shape)[0]
                f = _conv_flops(ins.attrs, shape_of(shapes, ins.operands[0]), shape_of(shapes, ins.operands[1]), out)
                add("convolution", f, mult, ins)
                total += f
            elif op == "custom-call":
                target = (re.search(r'custom_call_target="([^"]+)"', ins.attrs) or [None, "?"])[1]
                cfg = _backend_config(ins.attrs) or {}
                est = cfg.get("cost_estimate") or (cfg.get("custom_call_config") or {}).get("cost_estimate")
                op_name = (re.search(r'op_name="([^"]*)"', ins.attrs) or [None, ""])[1]
                pallas = re.search(r"([\w.\-]+)/(?:pallas_call|mpmd_map)", op_name)  # Pallas; Mosaic GPU kernels
                kname = cfg.get("name") or (cfg.get("custom_call_config") or {}).get("name") or (
                    pallas.group(1) if pallas else target)
                gemm = cfg.get("gemm_backend_config")
                f = None
                if isinstance(gemm, dict):  # a cuBLAS / cuBLASLt matmul (XLA:GPU's dots): a dot's count
                    contract = (gemm.get("dot_dimension_numbers") or {}).get("lhs_contracting_dimensions") or []
                    f = dot_flops(ins, [int(c) for c in contract], shapes)
                    kname = "cublas"
                elif any(z in target for z in _NO_FLOP_TARGETS):
                    f = 0.0
                elif isinstance(est, dict) and "flops" in est:
                    f = float(est["flops"])
                elif kernel_flops is not None:
                    f = kernel_flops(kname, [type_of(typed, o) for o in ins.operands], types(ins.shape))
                if f is None:
                    if mult and kname not in res.uncounted:
                        res.uncounted.append(kname)
                    f = 0.0
                add("custom-call", f, mult, ins)
                res.kernels[kname] = res.kernels.get(kname, 0.0) + f * mult
                total += f
            elif op == "while":
                body = _called(ins.attrs, "body")[0]
                cfg = _backend_config(ins.attrs) or {}
                n = (cfg.get("known_trip_count") or {}).get("n")
                derived = n is None
                if derived:
                    n = _trip_count_from_condition(comps, _called(ins.attrs, "condition")[0], ins, instrs)
                trips = 1 if n is None else int(n)
                if mult:  # not the measuring pass over a conditional's branches
                    res.loops.append((ins.name, trips))
                    if n is None:
                        res.unknown_loops.append(ins.name)
                    elif derived:
                        res.derived_loops.append(ins.name)
                total += trips * comp_flops(body, mult * trips)
            elif op == "conditional":
                branches = _called(ins.attrs, "branch_computations") or (
                    _called(ins.attrs, "true_computation") + _called(ins.attrs, "false_computation"))
                costs = [comp_flops(b, 0.0) for b in branches]  # measure without recording
                if costs:
                    best = branches[costs.index(max(costs))]
                    total += comp_flops(best, mult)
            elif op in ("fusion", "fusion-start", "call", "async-start"):
                for c in _called(ins.attrs, "calls"):
                    total += comp_flops(c, mult, top=op == "call")
        return total

    res.total = comp_flops(entry, 1.0)
    return res
