"""torch → ONNX for the four graphs of the contract, cleaned, checked and validated against torch."""
