"""convserve's contract between the exporter, the server and the client.

- :mod:`convserve_protocol.protos`: the generated gRPC and protobuf code of ``proto/*.proto``;
- :mod:`convserve_protocol.model_card`: what a model file says about itself;
- :mod:`convserve_protocol.preprocessing_spec`: how raw images become the model's input;
- :mod:`convserve_protocol.preprocessing`: the one implementation of that spec, for training, client and
  server (numpy; Pillow, the ``images`` extra, only to decode);
- :mod:`convserve_protocol.repository`: the model repository's layout.
"""
