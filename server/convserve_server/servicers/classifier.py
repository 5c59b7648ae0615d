"""The typed ``convserve.v1.Classifier`` servicer: images (a preprocessed tensor, or encoded files) in, labels out."""

from __future__ import annotations

import grpc.aio
import numpy as np

from convserve_protocol.protos import classifier_pb2 as pb
from convserve_protocol.protos import classifier_pb2_grpc as pb_grpc
from convserve_server.core import InferenceCore, ServedVersion
from convserve_server.errors import InvalidInput
from convserve_server.images import ImageDecoder
from convserve_server.metrics import ServerMetrics
from convserve_server.servicers.status import ServicerBase, deadline_of, rpc
from convserve_server.servicers.tensors import checked_shape, fp32_from_bytes



class ClassifierServicer(ServicerBase, pb_grpc.ClassifierServicer):
    """Classify and GetModelInfo."""

    def __init__(self, core: InferenceCore, metrics: ServerMetrics | None, decoder: ImageDecoder) -> None:
        super().__init__(core, metrics)
        self.decoder = decoder

    async def _resolve_with_images(self, request: pb.ClassifyRequest,
                                   deadline: float | None) -> tuple[ServedVersion, np.ndarray]:
        """The version asked for and the request's model input: its tensor, or its encoded images decoded
        with that version's preprocessing.

        The version is chosen again once the images are decoded, so that a hot swap during the decode
        answers the call with the new version rather than failing it on the retired one.  If the new
        version preprocesses differently, the images are decoded again with its spec.
        """
        if not request.encoded_images:
            shape = checked_shape(request.shape, "images", rank=4)
            images = fp32_from_bytes(request.images, shape, "images")
            return self.core.resolve(request.model_name, request.model_version), images
        if request.images or request.shape:
            raise InvalidInput("set either images (with shape) or encoded_images, not both")
        return await self.decoder.preprocess_for_current(
            lambda: self.core.resolve(request.model_name, request.model_version), request.encoded_images, deadline)

    @rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        deadline = deadline_of(context)
        served, images = await self._resolve_with_images(request, deadline)
        result = await self.core.classify(served, images, request.top_k or 1, deadline)
        labels = served.model.card.labels
        response = pb.ClassifyResponse(model_name=served.name, model_version=str(served.version))
        for row, (indices, scores) in enumerate(zip(result.top_indices.tolist(), result.top_scores.tolist())):
            image = response.results.add()
            for index, score in zip(indices, scores):
                image.top_k.add(label=labels[index], score=score, class_index=index)
            if request.include_probabilities:
                image.probabilities.extend(result.probabilities[row].tolist())
        return response

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        served = self.core.resolve(request.model_name, request.model_version)
        card = served.model.card
        height, width, channels = served.model.input_shape
        return pb.ModelInfo(
            name=served.name,
            version=str(served.version),
            labels=list(card.labels),
            height=height,
            width=width,
            channels=channels,
            preprocessing_json=card.preprocessing.to_json(),
            model_card_json=card.to_json(),
            max_batch_size=self.core.max_batch_size,
            execution_provider=served.model.provider,
            versions=[str(v) for v in self.core.versions(served.name)],
            is_default=served.name == self.core.default_model,
            verified=served.verification.verified,
            verification_provider=served.verification.provider,
            verification_worst_difference=served.verification.worst_difference,
            verification_tolerance=served.verification.tolerance,
        )
