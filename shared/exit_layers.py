"""The exit layers of a multi-exit edge (`--exit-layers 8 15`): checked once, the same way on both sides.

The last one is the split K (the cloud continues from its layer-K states); the earlier ones are early exits
inside the edge, each with its own exit head. Plain Python: the edge checks them without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from offramp.shared.errors import SplitConfigError


def check_exit_layers(layers: Sequence[int], num_layers: int | None = None) -> tuple[int, ...]:
    """`layers` as a tuple when they are strictly increasing ints in 1..num_layers-1 (each side keeps a layer);
    SplitConfigError naming the offending value otherwise."""
    layers = tuple(layers)
    if not layers:
        raise SplitConfigError("exit layers: give at least one (the split K)")
    where = f" in {list(layers)}" if len(layers) > 1 else ""
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise SplitConfigError(f"exit layer {layer!r}{where} must be an int >= 1")
        if num_layers is not None and layer > num_layers - 1:
            raise SplitConfigError(f"exit layer {layer}{where} is out of range: the model has {num_layers} layers, so {'each exit' if where else 'K'} must be in 1..{num_layers - 1}")
    for before, after in zip(layers, layers[1:]):
        if after == before:
            raise SplitConfigError(f"exit layer {after} appears twice in {list(layers)}")
        if after < before:
            raise SplitConfigError(f"exit layers must increase: {after} follows {before} in {list(layers)}")
    return layers
