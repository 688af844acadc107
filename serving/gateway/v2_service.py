"""The Open Inference Protocol v2's calls, whatever the transport: infer, model metadata,
model readiness and server metadata, over one ``GatewayCore``.

The HTTP routes (``routes.inference``, ``routes.ensembles``) and the gRPC service
(``grpc_service``) each read a request their own way (JSON or binary bodies; protobuf) into
a ``V2Infer``, authorise it, and write the answer their own way; everything between is here
once: which inputs a model takes and their limits, placement (versions, canaries, shards),
the coalescer's batching, an ensemble's scatter and gather. So a request means the same,
and is refused with the same message, on either transport.

    model = gw.model(name)                                   # 404 for an unknown name
    result = await infer(gw, model, request, envelope, route=f"/v2/models/{name}/infer")
    answer = v2.infer_answer(result, request)                # HTTP; grpc: v2_grpc
"""

from __future__ import annotations

from typing import Any

from serving.config import EnsembleEntry, ModelConfig, ServedEntry
from serving.gateway.core import GatewayCore
from serving.gateway.errors import wrong_route
from serving.gateway.limits import check_texts
from serving.gateway.protocols import v2
from serving.messages import Envelope, InferenceRequest, tensor_width
from serving.routing.ensemble_router import EnsembleRouter

INFER_TASKS = ("embed", "classify")
"""The tasks v2 infer serves (generation is OpenAI's routes')."""


async def model_inputs(gw: GatewayCore, model: ModelConfig, body: v2.V2Infer) -> tuple[Any, ...]:
    """A v2 request's inputs, checked as ``model`` takes them: for a tensor classifier (its
    replica's info says so) FP32 rows of its width, else texts."""
    if model.task == "classify":
        width = tensor_width(await gw.model_info(model.name))
        if width is not None:
            max_rows = model.limits.max_inputs
            return tuple(v2.tensor_rows(body, features=width, max_rows=max_rows))
    texts = v2.text_inputs(body)
    check_texts(texts, model.limits)
    return texts


async def ensemble_inputs(
    gw: GatewayCore, router: EnsembleRouter, body: v2.V2Infer
) -> tuple[Any, ...]:
    """The request's inputs, checked as the members take them: a classify ensemble asks its
    first member's info (tensor rows of its width, or texts); an embed ensemble takes texts.
    Limits are the ensemble entry's own (``limits``)."""
    limits = router.model.limits
    if router.model.task == "classify":
        width = tensor_width(await gw.model_info(router.members[0]))
        if width is not None:
            return tuple(v2.tensor_rows(body, features=width, max_rows=limits.max_inputs))
    texts = v2.text_inputs(body)
    check_texts(texts, limits)
    return texts


def check_infer_task(model: ServedEntry, route: str) -> None:
    """400 ``wrong_model_task`` for a model v2 infer does not serve (a generate model), the
    hint naming where it is served; ``route`` names the call (``/v2/models/x/infer``)."""
    if model.task not in INFER_TASKS:
        raise wrong_route(model.name, model.task, route)


async def infer(
    gw: GatewayCore, model: ServedEntry, request: v2.V2Infer, envelope: Envelope, *, route: str
) -> v2.V2Result:
    """``request`` answered by ``model`` (``gw.model(name)``): an ensemble scatters to its
    members and gathers, any other embed or classify model is placed and batched. ``route``
    names the call in the 400 a model of another task gets (``/v2/models/x/infer``)."""
    if isinstance(model, EnsembleEntry):
        router = gw.ensembles[model.name]
        inputs = await ensemble_inputs(gw, router, request)
        answer = await router.infer(InferenceRequest(model.name, inputs, envelope))
        return v2.V2Result(
            model=model.name,
            version=answer.version,
            output=v2.CLASSIFY_OUTPUT if model.task == "classify" else v2.EMBED_OUTPUT,
            matrix=answer.output,
            parameters=answer.parameters(),
            headers=answer.headers(),
        )
    check_infer_task(model, route)
    inputs = await model_inputs(gw, model, request)
    reply = await gw.infer(InferenceRequest(model.name, inputs, envelope))
    return v2.V2Result.of_reply(reply, model=model.name)


async def model_metadata(gw: GatewayCore, model: ServedEntry) -> dict[str, Any]:
    """v2 model metadata (``v2.ModelMetadata``'s shape): name, the routed version, platform
    ``loom-<task>``, inputs and outputs; an ensemble's names its first member's version and
    input, the combined output's width, and its members and combine in ``parameters``."""
    if isinstance(model, EnsembleEntry):
        return await _ensemble_metadata(gw, gw.ensembles[model.name])
    info = await gw.model_info(model.name)
    platform = "loom-" + model.task
    if model.task == "classify":
        return v2.classifier_metadata(
            model.name,
            [info["version"]],
            platform,
            features=info["features"],
            labels=info["labels"],
        )
    return v2.model_metadata(model.name, [info["version"]], info.get("dim"), platform)


async def _ensemble_metadata(gw: GatewayCore, router: EnsembleRouter) -> dict[str, Any]:
    first = router.members[0]
    info = await gw.model_info(first)
    if router.model.task == "classify":
        meta = v2.classifier_metadata(
            first, [info["version"]], "", features=info["features"], labels=info["labels"]
        )
    else:
        dims: list[int | None] = [(await gw.model_info(m)).get("dim") for m in router.members]
        known = [d for d in dims if d]
        width = sum(known) if len(known) == len(dims) else None
        meta = v2.model_metadata(first, [info["version"]], width, "")
    return router.metadata(meta)


async def model_ready(gw: GatewayCore, model: ServedEntry) -> bool:
    """Whether ``model`` can answer now: every routed version has a running replica (or is
    scaled to zero on purpose); an ensemble, when enough members are for its quorum."""
    if isinstance(model, EnsembleEntry):
        return await gw.ensembles[model.name].ready()
    return await gw.readiness.model_ready(gw.routed_name(model.name))


def server_metadata() -> dict[str, Any]:
    """v2 server metadata: name, version and the extensions served."""
    return {"name": v2.SERVER_NAME, "version": v2.SERVER_VERSION, "extensions": v2.EXTENSIONS}
