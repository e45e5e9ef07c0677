"""Quantized edge graphs: per-role recipes over the exported fp32 graph's weights, run by ONNX Runtime's kernels.

A recipe maps the torch module a weight came from (`edge.layers.3.mlp.down_proj`, `edge.head.lm_head`,
`edge.embed_tokens`: the exporter's name scopes, see `module_path`) to a scheme, first matching glob wins, so it
holds for any number of layers, exits or head kinds. Schemes (`Scheme.kind`):

- `q4_exact`: 4-bit, block 32 along K, asymmetric min/max, multiplied in fp32 (MatMulNBits accuracy_level 1).
  MatMulNBits' zero point is an integer, so each block's float minimum is restored by a correction term
  `(x @ E) @ C` (E sums x over each block, C holds the [blocks, N] residual offsets; ~1/32 of the weight's MACs).
  A weight that already lies on a 4-bit block grid (a GGUF Q4_0/Q4_1 checkpoint: the default model) is then
  stored losslessly; with `lossless_only` a weight off such a grid stays fp32 instead of being rounded (4-bit
  rounding of the default model's weights kept only 79% of the cloud's tokens).
- `nbits`: ONNX Runtime's MatMulNBits round-to-nearest quantizer (`bits`, `block_size`, symmetric, and
  `accuracy_level`: 4 = int8 activations quantized per block, the only fast 8-bit kernel here).
- `gather8`: the embedding as GatherBlockQuantized, uint8, symmetric, block 32 along the hidden size (lossless
  on a GGUF Q8_0 table; `lossless_only` keeps an off-grid table fp32).
- `fp32`: left as it is (also what an unmatched weight gets).

The shipped recipes (`RECIPES`, the graph precisions besides fp32) and the candidates they were chosen from
(`CANDIDATES`) are measured with one command, `offramp bench edge-step --candidates --accuracy` (add
`--exit-layers 15` for one K). Default model, 2026-12-01, shared 2-core machine: agreement = teacher-forced,
held-out text (models/edge_fidelity.py), the deep layers' argmax on the graph's layer-K states vs the full
model's; exit = the graph's exit-head argmax vs the fp32 edge part's; step = one intra-op thread, 128 positions
of context, interleaved medians (load average 5.5-10: absolute ms ~2.5x a quiet run, the ratio is the figure).

| K=15 | agreement (serving / human) | exit top-1 | step × fp32 | graph MB |
| --- | --- | --- | --- | --- |
| fp32 | 100% (6,946 positions) | 100% | 1.00 | 326.7 |
| **q4** (shipped: collaborative) | **100%** (100 / 100) | 98.96% | **0.51** | **77.6** |
| **int8** (shipped: standalone) | 97.41% (96.82 / 97.66) | 97.42% | 0.45 | 96.1 |
| int8 before this table (per-tensor embedding, block 64) | 96.4% (a) | - | 0.42 (c) | 85.7 |
| int8-b64 | 96.88% (96.38 / 97.09) | 96.69% | 0.46 | 119.3 |
| int8-keep-down (down_proj fp32) | 98.02% (b) | 97.95% | 0.53 | 134.3 |
| int8-keep-qkv (q/k/v fp32) | 98.31% (b) | 98.27% | 0.49 | 120.0 |
| q4-acc4 (ORT 4-bit RTN, int8 activations) | 80.39% (b) | 82.81% | 0.38 | 70.4 |
| q4-rtn-acc1 (ORT 4-bit RTN, fp32 compute) | 80.07% (b) | 82.84% | 0.42 | 70.4 |
| q4-head-fp32 (q4, exit head fp32) | 100% (b) | 100% | 0.63 | 187.3 |

(b) on the smaller held-out set below (2,774 positions), where int8 scored 97.73% and q4 100%.
K=10, on the smaller held-out set (12 prompts + 1,200 human tokens: `--accuracy-prompts 12 --human-tokens 1200`):

| K=10 | agreement (serving / human) | exit top-1 | step × fp32 | graph MB |
| --- | --- | --- | --- | --- |
| fp32 | 100% (2,774 positions) | 100% | 1.00 | 255.5 |
| **q4** | **100%** (100 / 100) | 98.96% | **0.46** | **63.7** |
| **int8** | 98.67% (98.44 / 98.75) | 97.66% | 0.43 | 75.9 |
| int8-b64 | 97.84% | 96.97% | 0.37 | 100.2 |
| int8-keep-down | 98.74% | 97.44% | 0.46 | 101.3 |
| int8-keep-qkv | 98.88% | 98.49% | 0.44 | 91.8 |
| q4-acc4 | 86.41% | 84.57% | 0.36 | 58.7 |
| q4-rtn-acc1 | 86.41% | 83.89% | 0.43 | 58.7 |
| q4-head-fp32 | 100% | 100% | 0.66 | 173.4 |

(a) chunked-prefill screening on the same text; (c) the README's earlier quiet-machine run. The 6,946-position
q4 row was measured before q/k/v and gate/up were fused (same states: blocks run down each column). Screening (chunked prefill,
embedding fp32, 8-bit block-64 int8-activation layers at 97.0%): keeping one role in fp32 gave down_proj
97.7%, o_proj 97.3%, layers 0-1 97.0%, q/k/v 98.0%, gate/up 97.3%; the per-tensor int8 embedding alone cost
1.8 points. No int8-activation variant reaches 99%: the outlier channels reach every role.

Kernels (ONNX Runtime 1.32 on this Sapphire Rapids CPU, one 576x1536 M=1 MatMul, median): fp32 MatMul 146 us;
MatMulNBits 8-bit accuracy_level 4 (int8 activations) 41-45 us, 4-bit level 4 23-29 us, 4-bit level 1 (fp32
compute) 67-75 us; 8-bit at levels 0-3 (fp32/fp16/bf16 compute) 1.0-1.1 ms and float zero points 2.2 ms (both
dequantize the whole weight per call); fp16 MatMul 149 us (no faster than fp32). So exact fp32 compute is
only fast at 4 bits, which is why q4 exists: on a GGUF Q4 checkpoint it loses nothing.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from offramp.shared.errors import OfframpError

GRID_BLOCK = 32  # GGUF's Q4_0 / Q4_1 / Q8_0 block length along a weight's input dimension
GRID_TOLERANCE = 1e-3  # how far (in quantization steps) a weight may sit from a grid and still be lossless
MS_DOMAIN = "com.microsoft"
SCHEME_KINDS = ("fp32", "q4_exact", "nbits", "gather8")


class QuantizationError(OfframpError, ValueError):
    """A recipe or scheme that cannot be applied to this graph."""


@dataclass(frozen=True)
class Scheme:
    """How one weight (a MatMul's B or the embedding table) is stored and multiplied; see the module docstring."""

    kind: str
    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    lossless_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEME_KINDS:
            raise QuantizationError(f"scheme kind {self.kind!r} is not one of {SCHEME_KINDS}")
        if self.kind == "nbits" and self.bits not in (2, 4, 8):
            raise QuantizationError(f"MatMulNBits bits={self.bits!r}: ONNX Runtime quantizes to 2, 4 or 8")
        if self.kind == "nbits" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise QuantizationError(f"MatMulNBits block_size={self.block_size!r} must be a power of 2, at least 16")

    def describe(self) -> dict:
        """The fields that matter for this kind (what the manifest records)."""
        if self.kind == "nbits":
            return {"kind": "nbits", "bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                    "accuracy_level": self.accuracy_level}
        if self.kind in ("q4_exact", "gather8"):
            return {"kind": self.kind, "block_size": GRID_BLOCK, "lossless_only": self.lossless_only}
        return {"kind": "fp32"}


@dataclass(frozen=True)
class Recipe:
    """Rules (module-path glob, scheme), first match wins; weights no rule matches stay fp32."""

    name: str
    rules: tuple[tuple[str, Scheme], ...]
    note: str = ""

    def scheme_for(self, path: str) -> Scheme:
        for pattern, scheme in self.rules:
            if fnmatch.fnmatchcase(path, pattern):
                return scheme
        return FP32

    def describe(self) -> dict:
        return {"recipe": self.name, "rules": [[p, s.describe()] for p, s in self.rules]}


FP32 = Scheme("fp32")
Q4_EXACT = Scheme("q4_exact", lossless_only=True)
GATHER8 = Scheme("gather8")
GATHER8_LOSSLESS = Scheme("gather8", lossless_only=True)


def nbits(bits: int = 8, block_size: int = 32, accuracy_level: int = 4, symmetric: bool = True) -> Scheme:
    return Scheme("nbits", bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level)


EMBEDDING = "edge.embed_tokens"
LAYERS = "edge.layers.*"
HEAD = "edge.head.*"

RECIPES: dict[str, Recipe] = {
    # The collaborative default: the layer-K states equal fp32's to rounding on a Q4 checkpoint; the exit head
    # (whose logits only choose drafts) takes int8 activations.
    "q4": Recipe("q4", ((EMBEDDING, GATHER8_LOSSLESS), (LAYERS, Q4_EXACT), (HEAD, nbits(8, 32, 4))),
                 "lossless 4-bit layers (fp32 compute), exact 8-bit embedding, 8-bit int8-compute head"),
    # Edge-standalone: everything in int8 compute, the fastest graph; its states cost the cloud a few % of tokens.
    "int8": Recipe("int8", ((EMBEDDING, GATHER8), (LAYERS, nbits(8, 32, 4)), (HEAD, nbits(8, 32, 4))),
                   "8-bit weights and int8 activations everywhere"),
}

# What the shipped recipes were chosen from (offramp bench edge-step --candidates; table in the module docstring).
CANDIDATES: dict[str, Recipe] = {
    **RECIPES,
    "int8-b64": Recipe("int8-b64", ((EMBEDDING, GATHER8), (LAYERS, nbits(8, 64, 4)), (HEAD, nbits(8, 64, 4)))),
    "int8-keep-down": Recipe("int8-keep-down", ((EMBEDDING, GATHER8), ("*.down_proj", FP32), (LAYERS, nbits(8, 32, 4)), (HEAD, nbits(8, 32, 4)))),
    "int8-keep-qkv": Recipe("int8-keep-qkv", ((EMBEDDING, GATHER8), ("*.self_attn.[qkv]_proj", FP32), (LAYERS, nbits(8, 32, 4)), (HEAD, nbits(8, 32, 4)))),
    "q4-acc4": Recipe("q4-acc4", ((EMBEDDING, GATHER8), (LAYERS, nbits(4, 32, 4, symmetric=False)), (HEAD, nbits(8, 32, 4)))),
    "q4-rtn-acc1": Recipe("q4-rtn-acc1", ((EMBEDDING, GATHER8), (LAYERS, nbits(4, 32, 1, symmetric=False)), (HEAD, nbits(8, 32, 4)))),
    "q4-head-fp32": Recipe("q4-head-fp32", ((EMBEDDING, GATHER8_LOSSLESS), (LAYERS, Q4_EXACT))),
}


def _quiet_ort_logs() -> None:
    """ONNX Runtime's quantizer calls logging.basicConfig(level=INFO) on import; keep its chatter out of exports."""
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (import first: it sets the levels)

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node was traced from (`edge.layers.0.self_attn.q_proj`), '' when the graph lacks it.

    The dynamo exporter records the module stack of every node in `pkg.torch.onnx.name_scopes`; the innermost
    `edge.*` entry names the weight's role independently of node numbering.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s.startswith("edge.")]
            return scopes[-1] if scopes else ""
    return ""


def weight_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, module path) of every MatMul with a 2-D initializer B and every Gather on a 2-D initializer table."""
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            found.append((node, module_path(node)))
        elif node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            found.append((node, module_path(node) or EMBEDDING))
    return found


# --- q4_exact ---------------------------------------------------------------------------------------------------


@dataclass
class Block4:
    """A [K, N] weight as MatMulNBits 4-bit blocks plus the residual block offsets C ([K/32, N])."""

    packed: np.ndarray  # [N, K/32, 16] uint8, two values a byte, low nibble first
    scales: np.ndarray  # [N * K/32] float32
    zero_points: np.ndarray  # [N * ceil(K/32 / 2)] uint8, packed like the values
    offsets: np.ndarray  # [K/32, N] float32
    grid_error: float  # largest distance of a weight from its block's grid, in steps of that block


def block4(weight: np.ndarray) -> Block4:
    """Quantize a [K, N] weight to 16 levels per 32-block between its min and max (exact when already on them)."""
    k, n = weight.shape
    if k % GRID_BLOCK:
        raise QuantizationError(f"q4_exact needs K divisible by {GRID_BLOCK}; this weight is {weight.shape}")
    blocks = weight.astype(np.float64).reshape(k // GRID_BLOCK, GRID_BLOCK, n).transpose(2, 0, 1)  # [N, kb, 32]
    lo, hi = blocks.min(axis=2, keepdims=True), blocks.max(axis=2, keepdims=True)
    step = (hi - lo) / 15
    step[step == 0] = 1.0
    q = np.clip(np.round((blocks - lo) / step), 0, 15)
    grid_error = float((np.abs(lo + step * q - blocks) / step).max())
    zp = np.clip(np.round(-lo / step), 0, 15)  # the integer zero point nearest the block's own
    offsets = (lo + step * zp)[..., 0]  # what (q - zp) * step misses: a constant per block, [N, kb]
    q8 = q.astype(np.uint8)
    zp8 = zp[..., 0].astype(np.uint8)
    if zp8.shape[1] % 2:
        zp8 = np.pad(zp8, ((0, 0), (0, 1)))
    return Block4(
        packed=q8[..., 0::2] | (q8[..., 1::2] << 4),
        scales=step[..., 0].astype(np.float32).reshape(-1),
        zero_points=(zp8[:, 0::2] | (zp8[:, 1::2] << 4)).reshape(-1),
        offsets=np.ascontiguousarray(offsets.T, dtype=np.float32),
        grid_error=grid_error,
    )


def _q4_exact_nodes(members: list[onnx.NodeProto], weights: list[np.ndarray], block_sum: str) -> tuple[list, list]:
    """MatMulNBits(x) + (x @ E) @ C for MatMuls that share their input x, fused into one (split after).

    Blocks run down each column, so quantizing the concatenated [K, sum N] weight equals quantizing each part;
    one kernel call and one correction instead of one per MatMul (q/k/v and gate/up share their inputs).
    """
    first = members[0]
    weight = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)
    b = block4(weight)
    k, n = weight.shape
    name = first.input[1] if len(members) == 1 else "+".join(m.input[1] for m in members)
    y = first.output[0] if len(members) == 1 else name + "_q4_out"
    inits = [
        numpy_helper.from_array(b.packed, name + "_q4"),
        numpy_helper.from_array(b.scales, name + "_q4_scales"),
        numpy_helper.from_array(b.zero_points, name + "_q4_zp"),
        numpy_helper.from_array(b.offsets, name + "_q4_offsets"),
    ]
    nodes = [
        helper.make_node("MatMulNBits", [first.input[0], name + "_q4", name + "_q4_scales", name + "_q4_zp"], [y + "_q4"],
                         name=first.name + "_q4", domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=GRID_BLOCK, accuracy_level=1),
        helper.make_node("MatMul", [block_sum, name + "_q4_offsets"], [y + "_q4_offset"], name=first.name + "_q4_offset"),
        helper.make_node("Add", [y + "_q4", y + "_q4_offset"], [y], name=first.name + "_q4_add"),
    ]
    if len(members) > 1:
        inits.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], dtype=np.int64), name + "_q4_split"))
        nodes.append(helper.make_node("Split", [y, name + "_q4_split"], [m.output[0] for m in members], name=first.name + "_q4_split", axis=-1))
    for new in nodes:
        new.metadata_props.extend(first.metadata_props)
    return nodes, inits


def _block_sum_matrix(k: int) -> np.ndarray:
    """E [K, K/32]: x @ E sums x over each block of 32."""
    e = np.zeros((k, k // GRID_BLOCK), dtype=np.float32)
    e[np.arange(k), np.arange(k) // GRID_BLOCK] = 1.0
    return e


# --- gather8 ------------------------------------------------------------------------------------------------------


def block8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """A [V, H] table as uint8 (q + 128) and [V, H/32] scales, symmetric per 32-block; plus the grid error in steps."""
    v, h = table.shape
    if h % GRID_BLOCK:
        raise QuantizationError(f"gather8 needs the hidden size divisible by {GRID_BLOCK}; the table is {table.shape}")
    blocks = table.astype(np.float64).reshape(v, h // GRID_BLOCK, GRID_BLOCK)
    scale = np.abs(blocks).max(axis=2) / 127
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale[..., None]), -127, 127)
    grid_error = float((np.abs(q * scale[..., None] - blocks) / scale[..., None]).max())
    return (q + 128).astype(np.uint8).reshape(v, h), scale.astype(np.float32), grid_error


def _gather8(model: onnx.ModelProto, node: onnx.NodeProto, lossless_only: bool, tied: list[tuple[onnx.NodeProto, Scheme]]) -> dict:
    """Replace the embedding Gather (axis 0 on [V, H], or axis 1 on the folded [H, V] + its Transpose).

    The table is stored once as uint8 [V, H/32, 32]: that is also MatMulNBits' 8-bit layout of the [H, V] LM-head
    weight, so a tied head (`tied`: MatMuls whose B is this table, with an 8-bit symmetric block-32 nbits scheme)
    reads the same bytes instead of a second copy.
    """
    g = model.graph
    table_name = node.input[0]
    table = numpy_helper.to_array(next(i for i in g.initializer if i.name == table_name))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    replaced = [node]
    out = node.output[0]
    if axis == 1:  # fold_weight_transposes' form: Gather columns of [H, V], then Transpose to [..., H]
        table = table.T
        consumers = [n for n in g.node if node.output[0] in n.input]
        if len(consumers) != 1 or consumers[0].op_type != "Transpose":
            raise QuantizationError(f"embedding Gather {node.name!r} on axis 1 is not followed by its Transpose")
        replaced.append(consumers[0])
        out = consumers[0].output[0]
    elif axis != 0:
        raise QuantizationError(f"embedding Gather {node.name!r} has axis {axis}; expected 0 or 1")
    data, scales, grid_error = block8_rows(np.ascontiguousarray(table))
    if lossless_only and grid_error > GRID_TOLERANCE:
        return {"scheme": "fp32", "grid_error": grid_error, "tied": []}
    v, h = table.shape
    name = table_name + "_q8"
    g.initializer.extend([
        numpy_helper.from_array(data.reshape(v, h // GRID_BLOCK, GRID_BLOCK), name),
        numpy_helper.from_array(scales[..., None], name + "_row_scales"),
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), name + "_row_shape"),
    ])
    gathered = helper.make_node("GatherBlockQuantized", [name, node.input[1], name + "_row_scales"], [out + "_blocks"], name=node.name + "_q8",
                                domain=MS_DOMAIN, bits=8, block_size=GRID_BLOCK, gather_axis=0, quantize_axis=2)
    rows = helper.make_node("Reshape", [out + "_blocks", name + "_row_shape"], [out], name=node.name + "_q8_rows")
    replacements = {node.output[0]: [gathered, rows]}  # by output name: protobuf node wrappers have no stable id()
    for r in replaced[1:]:
        replacements[r.output[0]] = []
    if tied:
        g.initializer.append(numpy_helper.from_array(scales.reshape(-1), name + "_scales"))
    for mm, scheme in tied:
        new = helper.make_node("MatMulNBits", [mm.input[0], name, name + "_scales"], list(mm.output), name=mm.name + "_q8",
                               domain=MS_DOMAIN, K=h, N=v, bits=8, block_size=GRID_BLOCK, accuracy_level=scheme.accuracy_level)
        new.metadata_props.extend(mm.metadata_props)
        replacements[mm.output[0]] = [new]
    for new in (gathered, rows):
        new.metadata_props.extend(node.metadata_props)
    nodes = [n2 for n1 in g.node for n2 in replacements.get(n1.output[0], [n1])]
    del g.node[:]
    g.node.extend(nodes)
    return {"scheme": "gather8", "grid_error": grid_error, "tied": [mm.name for mm, _ in tied]}


def _is_tied(model: onnx.ModelProto, matmul: onnx.NodeProto, gather: onnx.NodeProto) -> bool:
    """Whether a MatMul's [H, V] weight is the gathered table: the same initializer (a folded tied graph) or an
    equal copy of it (the exporter folds the transpose of a small tied table into a second initializer)."""
    if matmul.input[1] == gather.input[0]:
        return True
    inits = {i.name: i for i in model.graph.initializer}
    weight, table = inits[matmul.input[1]], inits[gather.input[0]]
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis != 0 or list(weight.dims) != list(table.dims)[::-1]:
        return False
    return bool(np.array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(table).T))


def _shares_table(scheme: Scheme) -> bool:
    """Whether a tied LM head under `scheme` can read the gather8 table's bytes (8-bit, symmetric, block 32)."""
    return scheme.kind == "nbits" and scheme.bits == 8 and scheme.symmetric and scheme.block_size == GRID_BLOCK


# --- nbits (ONNX Runtime's quantizer) -----------------------------------------------------------------------------


def _nbits(model: onnx.ModelProto, names: list[str], scheme: Scheme) -> onnx.ModelProto:
    """MatMulNBits for exactly the MatMuls `names` (every other node is excluded from this pass)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, accuracy_level=scheme.accuracy_level,
        bits=scheme.bits, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),),
    )
    wanted = set(names)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    return quantizer.model.model


# --- the pass -----------------------------------------------------------------------------------------------------


def _on_state_path(path: str) -> bool:
    """Whether a weight feeds the layer-K states the cloud continues from (not only the exit head's logits)."""
    return path == EMBEDDING or fnmatch.fnmatchcase(path, LAYERS)


def quantize_model(model: onnx.ModelProto, recipe: Recipe) -> tuple[onnx.ModelProto, dict]:
    """Apply `recipe` to an exported fp32 edge graph; returns the graph and what the manifest records.

    The record says per scheme how many weights took it (`applied`), the largest grid error met (in steps:
    ~0 means the checkpoint was already on that grid), and `lossless_states`: whether every weight feeding
    the layer-K states is fp32 or stored exactly, i.e. the states equal the fp32 graph's up to rounding.
    """
    _quiet_ort_logs()
    if not any(module_path(n) for n in model.graph.node):
        raise QuantizationError("the graph carries no module name scopes (pkg.torch.onnx.name_scopes): re-export it with offramp")
    inits = {i.name: i for i in model.graph.initializer}
    plan = [(node, path, recipe.scheme_for(path)) for node, path in weight_nodes(model)]
    applied: list[tuple[str, str, bool]] = []  # (module path, what it became, exact)
    worst: dict[str, float] = {}
    # gather8 first: it reads the fp32 table a tied LM head's MatMul shares (nbits leaves that initializer alone).
    shared: set[str] = set()  # tied LM-head MatMuls that read the gather8 table's bytes
    for node, path, scheme in plan:
        if node.op_type != "Gather":
            continue
        if scheme.kind not in ("fp32", "gather8"):
            raise QuantizationError(f"{path} is an embedding Gather; scheme {scheme.kind!r} is for MatMuls")
        if scheme.kind == "fp32":
            applied.append((path, "fp32", True))
            continue
        tied = [(mm, s) for mm, _, s in plan if mm.op_type == "MatMul" and _shares_table(s) and _is_tied(model, mm, node)]
        result = _gather8(model, node, scheme.lossless_only, tied)
        worst["gather8"] = max(worst.get("gather8", 0.0), result["grid_error"])
        applied.append((path, result["scheme"], result["scheme"] == "fp32" or result["grid_error"] <= GRID_TOLERANCE))
        for mm, mm_path, s in plan:
            if mm.name in result["tied"]:
                shared.add(mm.name)
                applied.append((mm_path, f"nbits8-b32-acc{s.accuracy_level} (embedding's bytes)", False))
    schemes = {node.name: (path, scheme) for node, path, scheme in plan if node.op_type == "MatMul"}
    fused: dict[str, list[tuple[onnx.NodeProto, np.ndarray]]] = {}  # input name -> its lossless q4 MatMuls
    for node in model.graph.node:
        path, scheme = schemes.get(node.name, ("", None)) if node.op_type == "MatMul" else ("", None)
        if scheme is None or scheme.kind != "q4_exact":
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        error = block4(weight).grid_error
        worst["q4_exact"] = max(worst.get("q4_exact", 0.0), error)
        if scheme.lossless_only and error > GRID_TOLERANCE:
            applied.append((path, "fp32", True))
            continue
        fused.setdefault(node.input[0], []).append((node, weight))
        applied.append((path, "q4_exact", error <= GRID_TOLERANCE))
    new_nodes, new_inits = [], []
    members = {node.output[0]: x for x, group in fused.items() for node, _ in group}  # outputs are unique (SSA)
    for node in model.graph.node:
        x = members.get(node.output[0])
        if x is None:
            new_nodes.append(node)
            continue
        group = fused.pop(x, None)
        if group is None:  # a later member of a group already emitted at its first member
            continue
        k = group[0][1].shape[0]
        e_name = f"q4_block_sum_{k}"
        if not any(i.name == e_name for i in new_inits):
            new_inits.append(numpy_helper.from_array(_block_sum_matrix(k), e_name))
        new_nodes.append(helper.make_node("MatMul", [x, e_name], [x + "_q4_block_sum"], name=x + "_q4_block_sum"))
        nodes, weights = _q4_exact_nodes([n for n, _ in group], [w for _, w in group], x + "_q4_block_sum")
        new_nodes += nodes
        new_inits += weights
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    groups: dict[Scheme, list[tuple[str, str]]] = {}
    for node, path, scheme in plan:
        if node.op_type == "MatMul" and scheme.kind == "nbits" and node.name not in shared:
            groups.setdefault(scheme, []).append((node.name, path))
        elif node.op_type == "MatMul" and scheme.kind == "fp32":
            applied.append((path, "fp32", True))
    for scheme, members in groups.items():
        model = _nbits(model, [name for name, _ in members], scheme)
        label = f"nbits{scheme.bits}-b{scheme.block_size}-acc{scheme.accuracy_level}"
        applied += [(path, label, False) for _, path in members]
    _drop_unused_initializers(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    record = {
        **recipe.describe(),
        "applied": dict(sorted(Counter(kind for _, kind, _ in applied).items())),
        "grid_error_steps": {k: round(v, 6) for k, v in worst.items()},
        "lossless_states": all(exact for path, _, exact in applied if _on_state_path(path)),
    }
    return model, record


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_graph(src: Path, dst: Path, recipe: Recipe | str) -> dict:
    """Quantize the fp32 edge graph file `src` into `dst` with a recipe (or a RECIPES name); returns the manifest entry."""
    if isinstance(recipe, str):
        if recipe not in CANDIDATES:
            raise QuantizationError(f"unknown quantization recipe {recipe!r}; known: {sorted(CANDIDATES)}")
        recipe = CANDIDATES[recipe]
    model = onnx.load(str(src))
    model, record = quantize_model(model, recipe)
    from offramp.models.export import save_graph

    save_graph(model, Path(dst))
    return record


def quantize_edge_dir(fp32_dir: Path | str, out_dir: Path | str, recipe: Recipe | str) -> Path:
    """A quantized copy of an exported fp32 edge-graph dir (graph + manifest), named after the recipe.

    For comparing recipes without tracing the model again; `offramp export --precision` goes through
    `export_edge`, which writes the same manifest fields.
    """
    import json
    import shutil

    from offramp.shared.edge_manifest import GRAPH_FILE, MANIFEST_FILE, read_manifest

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    manifest = read_manifest(fp32_dir)
    if manifest.get("precision") != "fp32":
        raise QuantizationError(f"{fp32_dir} holds a {manifest.get('precision')!r} graph; quantize from the fp32 one")
    name = recipe if isinstance(recipe, str) else recipe.name
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record = quantize_graph(fp32_dir / manifest.get("graph_file", GRAPH_FILE), tmp / GRAPH_FILE, recipe)
    manifest.update(precision=name, quantization=record,
                    files={p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()})
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
