"""convserve over HTTP/REST: the Open Inference Protocol's REST API with Triton's extensions, image
classification from files, an OpenAPI document, and a page to try a model; on the gRPC server's loop and core."""
