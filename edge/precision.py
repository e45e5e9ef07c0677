"""Which edge graph precision runs: `auto` picks by what the edge does, among the graphs an edge directory holds."""

from __future__ import annotations

from collections.abc import Sequence

from offramp.shared.edge_manifest import PRECISIONS
from offramp.shared.errors import ArtifactError

EDGE_PRECISIONS = ("auto", *PRECISIONS)


def resolve_precision(precision: str, cloud: str, available: Sequence[str] = PRECISIONS) -> str:
    """`auto`: the int8 graph when the edge works alone, the fp32 graph when it sends hidden states to a cloud
    (or the one graph `available` holds); an explicit precision must be among `available`.

    Measured on the default model at K=15 (always escalating, 6 prompts x 40 tokens): with the int8 graph's
    layer-K states the cloud's greedy output kept the full model's for only 44% of tokens (common prefix;
    int8 activations in MatMulNBits accuracy level 4 lose the outlier channels), with fp32 for 100%.
    """
    if precision not in EDGE_PRECISIONS:
        raise ArtifactError(f"edge precision {precision!r} is not one of {EDGE_PRECISIONS}")
    if precision == "auto":
        preferred = "int8" if cloud == "none" else "fp32"
        if preferred in available:
            return preferred
        if len(available) == 1:
            return available[0]
        raise ArtifactError(f"no edge graph to run: the edge directory holds {list(available)}")
    if precision not in available:
        raise ArtifactError(f"--edge-precision {precision} asks for a graph the edge directory does not hold (it has {list(available)}); export it with `offramp export --precision {precision}`")
    return precision
