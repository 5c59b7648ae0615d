"""The seed CNN: the classic Keras beginner convnet, sized by its input and class count."""

from __future__ import annotations

import keras

DEFAULT_INPUT_SHAPE = (28, 28, 3)
DROPOUT_RATE = 0.5


def build_model(input_shape: tuple[int, int, int], num_classes: int, learning_rate: float = 1e-3) -> keras.Sequential:
    """Conv 32 → pool → conv 64 → pool → flatten → dense 64 → dropout → softmax, compiled."""
    model = keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(DROPOUT_RATE),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="convserve_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
