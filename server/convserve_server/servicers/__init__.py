"""Thin gRPC servicers: protobuf in, calls on the core, protobuf out."""
