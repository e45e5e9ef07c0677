"""Which checkpoints offramp can split, checked up front rather than deep in a forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from offramp.shared.errors import SplitConfigError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class Geometry:
    """The shapes both halves of a split model and the wire protocol depend on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Geometry":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
        )


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedArchitectureError unless the model is a Llama-family decoder offramp can split."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; offramp splits {sorted(SUPPORTED_MODEL_TYPES)} decoders"
        )
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no model.{attr}; cannot split it")
    layer = inner.layers[0]
    for part in _LAYER_PARTS:
        obj = layer
        for name in part.split("."):
            obj = getattr(obj, name, None)
        if obj is None:
            raise UnsupportedArchitectureError(f"decoder layer {type(layer).__name__} lacks {part}; cannot split it")


def check_exit_layer(model: PreTrainedModel, exit_layer: int) -> None:
    """An exit layer must leave at least one layer on each side."""
    n = model.config.num_hidden_layers
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= n - 1:
        raise SplitConfigError(f"exit layer {exit_layer!r} is out of range: the model has {n} layers, so K must be in 1..{n - 1}")
