from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "images", "shape", "top_k", "include_probabilities", "encoded_images")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    images: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    include_probabilities: bool
    encoded_images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., images: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., include_probabilities: _Optional[bool] = ..., encoded_images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score", "class_index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    class_index: int
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., class_index: _Optional[int] = ...) -> None: ...

class ImageClassification(_message.Message):
    __slots__ = ("top_k", "probabilities")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    top_k: _containers.RepeatedCompositeFieldContainer[Prediction]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, top_k: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "results")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[ImageClassification]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageClassification, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "labels", "height", "width", "channels", "preprocessing_json", "model_card_json", "max_batch_size", "execution_provider", "versions", "verified", "verification_provider", "verification_worst_difference", "verification_tolerance", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_WORST_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    height: int
    width: int
    channels: int
    preprocessing_json: str
    model_card_json: str
    max_batch_size: int
    execution_provider: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    verified: bool
    verification_provider: str
    verification_worst_difference: float
    verification_tolerance: float
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., preprocessing_json: _Optional[str] = ..., model_card_json: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., execution_provider: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., verified: _Optional[bool] = ..., verification_provider: _Optional[str] = ..., verification_worst_difference: _Optional[float] = ..., verification_tolerance: _Optional[float] = ..., is_default: _Optional[bool] = ...) -> None: ...
