"""Exception types shared by every part of offramp, so callers can catch by meaning."""


class OfframpError(Exception):
    """Base of every error offramp raises on purpose."""


class ModelSpecError(OfframpError, ValueError):
    """A model spec (name, directory or file) that cannot be resolved to a checkpoint."""


class UnsupportedArchitectureError(OfframpError, ValueError):
    """A checkpoint whose decoder layers offramp cannot split."""


class SplitConfigError(OfframpError, ValueError):
    """An exit layer or other split setting that does not fit the model."""


class ArtifactError(OfframpError, ValueError):
    """An exported edge graph or trained head that is missing, corrupt or for another model."""


class ContextLengthError(OfframpError, ValueError):
    """A sequence longer than the model's context window (edge runtimes raise it; both the ONNX and the reference)."""
