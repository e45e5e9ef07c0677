"""The edge: shallow layers + exit head in ONNX Runtime (or PyTorch), the decode loop, the cloud link."""
