"""Offline training of the convserve CNN and its export to ONNX (needs TensorFlow)."""
