"""The seed CNN's architecture."""

from __future__ import annotations

import keras

from convserve_training.model import build_model


def test_architecture_and_parameter_count_match_the_design():
    model = build_model((28, 28, 3), 10)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout", "Dense",
    ]
    conv1, _, conv2, _, _, dense, dropout, head = model.layers
    assert (conv1.filters, conv1.kernel_size, conv2.filters, conv2.kernel_size) == (32, (3, 3), 64, (3, 3))
    assert (dense.units, dropout.rate, head.units) == (64, 0.5, 10)
    assert head.activation is keras.activations.softmax
    assert model.count_params() == 122_506
    assert model.input_shape == (None, 28, 28, 3)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.loss == "categorical_crossentropy"


def test_input_size_and_class_count_are_configurable():
    model = build_model((32, 40, 3), 3)
    assert model.input_shape == (None, 32, 40, 3)
    assert model.output_shape == (None, 3)
