"""Keras → ONNX with tf2onnx, the model card in the file's metadata, and a parity check.

``tf2onnx.convert.from_keras`` fails on Keras 3 models, so the model is
wrapped in a ``tf.function`` with a named ``TensorSpec`` and converted from
that.  Before anything is written, the ONNX graph is run in ONNX Runtime on
held-out images and must agree with Keras to within ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from convserve_protocol.golden import GoldenVectors
from convserve_protocol.model_card import ModelCard
from convserve_training.config import DEFAULT_OPSET
from convserve_training.errors import TrainingError

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
"""Largest absolute difference allowed between a Keras and an ONNX probability."""
BATCH_DIM = "batch"


class ParityError(TrainingError):
    """ONNX Runtime and Keras disagree on the same inputs."""


def convert_to_onnx(model: keras.Model, card: ModelCard, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The model as ONNX: input ``image`` (N, H, W, 3) float32, output ``probabilities``, card in metadata."""
    if opset < DEFAULT_OPSET:
        raise TrainingError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    spec = card.preprocessing
    signature = (tf.TensorSpec((None, spec.height, spec.width, spec.channels), tf.float32, name=card.input_name),)

    @tf.function(input_signature=signature)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {card.output_name: model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    for tensor in (*proto.graph.input, *proto.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    proto.doc_string = f"convserve CNN {card.model_name} v{card.model_version}, trained on {card.dataset}"
    onnx.helper.set_model_props(proto, card.to_metadata())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def onnx_probabilities(model_bytes: bytes, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run ``images`` through the serialized ONNX model on the CPU."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    chunks = [session.run(None, {input_name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def check_parity(keras_probabilities: np.ndarray, model_bytes: bytes, images: np.ndarray) -> float:
    """The largest |Keras − ONNX| difference; raises :class:`ParityError` above the tolerance."""
    onnx_result = onnx_probabilities(model_bytes, images)
    if onnx_result.shape != keras_probabilities.shape:
        raise ParityError(f"ONNX output shape {onnx_result.shape} differs from Keras {keras_probabilities.shape}")
    worst = float(np.max(np.abs(onnx_result - keras_probabilities)))
    if not worst <= PARITY_TOLERANCE:
        raise ParityError(f"ONNX and Keras probabilities differ by {worst:.3g} (> {PARITY_TOLERANCE:g})")
    log.info("parity: ONNX matches Keras within %.3g on %d images", worst, len(images))
    return worst


def check_golden(golden: GoldenVectors, model_bytes: bytes) -> float:
    """The worst difference ONNX Runtime (CPU) shows on the card's golden vectors; :class:`ParityError` above
    their tolerance, since every server would then refuse the file."""
    worst = golden.worst_difference(onnx_probabilities(model_bytes, golden.inputs))
    if not worst <= golden.tolerance:
        raise ParityError(f"golden vectors: ONNX differs from Keras by {worst:.3g} (> tolerance {golden.tolerance:g}); "
                          "a server would refuse this file")
    return worst
