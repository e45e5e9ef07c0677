"""Model side: loading checkpoints, splitting at layer K, exit heads, ONNX export."""

from offramp.models.checkpoints import load_model
from offramp.models.fingerprint import model_fingerprint
from offramp.models.split import CloudPart, EdgePart, split_model

__all__ = ["load_model", "model_fingerprint", "split_model", "EdgePart", "CloudPart"]
