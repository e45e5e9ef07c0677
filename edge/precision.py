"""Which edge graph precision runs: `auto` picks by what the edge does, among the graphs an edge directory holds."""

from __future__ import annotations

from collections.abc import Sequence

from offramp.shared.edge_manifest import PRECISIONS
from offramp.shared.errors import ArtifactError

EDGE_PRECISIONS = ("auto", *PRECISIONS)


def resolve_precision(precision: str, cloud: str, available: Sequence[str] = PRECISIONS) -> str:
    """`auto`: the int8 graph when the edge works alone (else q4, else fp32: any graph serves alone), the q4 graph
    (else fp32) when it sends hidden states to a cloud (or the one graph `available` holds); an explicit precision
    must be among `available`.

    What the cloud continues from is the layer-K state, so collaboration takes the graph whose states equal fp32's:
    q4 stores the layers' weights losslessly where the checkpoint already lies on a 4-bit block grid (the default
    model) and multiplies in fp32; a weight off the grid stays fp32, so q4 is never less faithful than fp32. On
    the default model at K=15 (teacher-forced, 6,946 held-out positions, `offramp bench edge-step --accuracy`)
    the cloud's greedy token was kept at 100% of positions with q4 and fp32, 97.4% with int8 (int8 activations
    lose Llama's outlier channels), at 0.51x (q4) and 0.45x (int8) the fp32 graph's step time (table in
    offramp.models.quantize). Alone, the edge only needs its exit head's logits, and int8 is the fastest graph.
    """
    if precision not in EDGE_PRECISIONS:
        raise ArtifactError(f"edge precision {precision!r} is not one of {EDGE_PRECISIONS}")
    if precision == "auto":
        for preferred in (("int8", "q4", "fp32") if cloud == "none" else ("q4", "fp32")):
            if preferred in available:
                return preferred
        if len(available) == 1:
            return available[0]
        raise ArtifactError(f"no edge graph to run: the edge directory holds {list(available)}")
    if precision not in available:
        raise ArtifactError(f"--edge-precision {precision} asks for a graph the edge directory does not hold (it has {list(available)}); export it with `offramp export --precision {precision}`")
    return precision
