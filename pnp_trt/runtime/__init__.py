"""Backends (torch, ONNX Runtime, TensorRT) behind one `Backend` protocol, and the sampler over it."""
