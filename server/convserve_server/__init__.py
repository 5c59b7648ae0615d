"""convserve's inference server: ONNX Runtime behind gRPC, with a dynamic batcher."""
