"""A typed model of the KubeRay ``RayCluster`` object that ``loom deploy render`` writes.

Written from KubeRay's documented ``ray.io/v1`` API as of KubeRay v1.4 (``docs/reference/api.md``
and ``ray-operator/apis/ray/v1/raycluster_types.go``; ``AutoscalerOptions.version`` is the v1.4
field), it covers exactly the fields Loom's renderer sets. Every model refuses a field it does not
know, so a misspelt key (``minReplica``) fails here, naming its path, before a cluster sees it.

It reads the API more strictly than the CRD does, on purpose:

- fields Loom always writes are required here although KubeRay defaults them (``replicas``,
  ``minReplicas``, ``maxReplicas``, ``rayStartParams``, ``enableInTreeAutoscaling``);
- JSON types are exact, as the API server checks them: ``replicas: "3"`` or a ``rayStartParams``
  value of ``0`` (KubeRay's ``map[string]string``) is refused, not coerced;
- KubeRay's own checks are applied: the cluster name is a DNS-1035 label of at most 53 characters,
  worker group names are unique (its webhook), and ``0 <= minReplicas <= replicas <= maxReplicas``;
- a Redis password is only a Secret reference (``valueFrom.secretKeyRef``); KubeRay's plain
  ``value`` is refused, so no password is ever written into a manifest.

Pod templates (``template``) stay ``dict[str, Any]``: they are core ``PodTemplateSpec``s, checked
against the Kubernetes schemas on their own, each wrapped in a ``v1 PodTemplate``
(``pod_templates`` lists them). Nothing here talks to a cluster.

    cluster = validate_raycluster(rendered)  # or KubeRayError("spec.workerGroupSpecs.1...")
    cluster.spec.workerGroupSpecs[0].maxReplicas  # 4
    [group for group, _ in pod_templates(rendered)]  # ["headgroup", "gateway", "gpu"]
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

INT32_MAX = 2**31 - 1
"""KubeRay's replica counts and timeouts are ``int32`` (``*int32`` in raycluster_types.go)."""

HEAD_GROUP = "headgroup"
"""The group KubeRay puts the head pod in (its ``ray.io/group`` label). KubeRay does not stop a
worker group taking the name, but its pods would then share the head's label, so this model does;
``pod_templates`` lists the head's template under it."""

MAX_CLUSTER_NAME_CHARS = 53
"""KubeRay's ``MaxRayClusterNameLength``: 63 less ``-serve-svc``, its longest Service suffix."""

DNS_LABEL_MAX_CHARS = 63

_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class KubeRayError(ValueError):
    """A RayCluster this model refuses; the message names each field by its path
    (``spec.workerGroupSpecs.1.maxReplicas: ...``), several separated by ``; ``."""


def _dns_label(value: str, *, what: str, pattern: re.Pattern[str], max_chars: int) -> str:
    if len(value) > max_chars or not pattern.fullmatch(value):
        first = "a letter" if pattern is _DNS_1035_LABEL else "a letter or digit"
        raise ValueError(
            f"{value!r} is not a {what}: lower-case letters, digits and '-', starting with "
            f"{first}, ending with a letter or digit, at most {max_chars} characters"
        )
    return value


def _string_values(params: object) -> object:
    """rayStartParams is KubeRay's ``map[string]string``: YAML's ``num-cpus: 0`` is an int there,
    and the API server refuses the whole object. Name every such key, with the fix."""
    if isinstance(params, dict):
        wrong = [
            f"{key!r} is {type(value).__name__} {value!r}"
            for key, value in params.items()
            if not isinstance(value, str)
        ]
        if wrong:
            raise ValueError(
                "rayStartParams values must be strings (KubeRay's map[string]string), quote "
                "them: " + ", ".join(wrong)
            )
    return params


RayStartParams = Annotated[dict[str, str], BeforeValidator(_string_values)]
"""``ray start`` options without the leading ``--``: ``{"num-cpus": "0"}``."""

Quantity = str | int | float
"""A Kubernetes resource quantity as JSON carries it: ``"500m"``, ``"512Mi"``, ``1``."""


class _Strict(BaseModel):
    # extra="forbid": an unknown key is an error; strict: JSON types exactly, no "3" -> 3
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ObjectMeta(_Strict):
    """The part of the core ``ObjectMeta`` Loom sets on its RayCluster."""

    name: str = Field(
        description="The RayCluster's name: a DNS-1035 label of at most 53 characters (KubeRay "
        "refuses others); its pods and Services are named after it."
    )
    namespace: str | None = Field(
        None, description="Namespace (a DNS-1123 label); None: the one it is applied to."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Labels, string values.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations, string values."
    )

    @field_validator("name")
    @classmethod
    def _name_is_dns_1035_label(cls, name: str) -> str:
        return _dns_label(
            name, what="DNS-1035 label", pattern=_DNS_1035_LABEL, max_chars=MAX_CLUSTER_NAME_CHARS
        )

    @field_validator("namespace")
    @classmethod
    def _namespace_is_dns_1123_label(cls, namespace: str | None) -> str | None:
        if namespace is None:
            return None
        return _dns_label(
            namespace,
            what="DNS-1123 label",
            pattern=_DNS_1123_LABEL,
            max_chars=DNS_LABEL_MAX_CHARS,
        )


class ResourceRequirements(_Strict):
    """The two maps of a core ``ResourceRequirements`` that Loom sets."""

    limits: dict[str, Quantity] | None = Field(
        None, description="Most of each resource the container may use: {cpu: 500m}."
    )
    requests: dict[str, Quantity] | None = Field(
        None, description="What the scheduler reserves for the container: {memory: 512Mi}."
    )


class AutoscalerOptions(_Strict):
    """KubeRay's ``AutoscalerOptions``: the Ray autoscaler container it adds to the head pod."""

    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = Field(
        None,
        description="Conservative: pending worker pods at most the cluster's size; Default (and "
        "its alias Aggressive): not rate-limited. Read by the Ray autoscaler.",
    )
    idleTimeoutSeconds: int | None = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="A worker pod that uses no Ray resources this long is removed (KubeRay "
        "default 60). Read by the Ray autoscaler.",
    )
    resources: ResourceRequirements | None = Field(
        None,
        description="The autoscaler container's requests and limits (KubeRay default 500m CPU, "
        "512Mi memory).",
    )
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="The autoscaler container's image pull policy (core PullPolicy)."
    )
    version: Literal["v1", "v2"] | None = Field(
        None,
        description="Autoscaler v1 or v2; None: the Ray version decides (v2 from Ray 2.47).",
    )


class SecretKeySelector(_Strict):
    """A core ``SecretKeySelector``: one key of a Secret in the RayCluster's namespace."""

    name: str = Field(min_length=1, description="The Secret's name.")
    key: str = Field(min_length=1, description="The key within the Secret whose value is used.")


class EnvVarSource(_Strict):
    """The part of a core ``EnvVarSource`` Loom uses: a Secret's key, never a literal."""

    secretKeyRef: SecretKeySelector = Field(description="The Secret key holding the value.")


class RedisCredential(_Strict):
    """KubeRay's ``RedisCredential`` as a Secret reference only (its plain ``value`` is refused)."""

    valueFrom: EnvVarSource = Field(description="Where the head pod reads the credential from.")


class GcsFaultToleranceOptions(_Strict):
    """KubeRay's ``GcsFaultToleranceOptions`` (KubeRay >= 1.3): the head's GCS keeps its state in
    Redis, so a restarted head pod recovers the cluster instead of ending it."""

    redisAddress: str = Field(
        min_length=1, description="Redis for the GCS state: host:port or redis://host:port."
    )
    externalStorageNamespace: str | None = Field(
        None,
        description="The key namespace within Redis; None: KubeRay uses the RayCluster's UID.",
    )
    redisPassword: RedisCredential | None = Field(
        None, description="Redis's password, from a Secret; None: Redis asks for none."
    )


class AuthOptions(_Strict):
    """KubeRay's ``AuthOptions`` (KubeRay >= 1.5.1, Ray >= 2.52): with ``mode: token`` the
    operator makes a Secret with a random token and sets ``RAY_AUTH_MODE`` and
    ``RAY_AUTH_TOKEN`` on every Ray container, so only the cluster's own pods reach its GCS,
    raylets and dashboard."""

    mode: Literal["disabled", "token"] = Field(description="disabled or token.")


class HeadGroupSpec(_Strict):
    """KubeRay's ``HeadGroupSpec``: the one head pod (GCS, dashboard, autoscaler, Loom's control
    plane)."""

    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = Field(
        None, description="The head Service's type (core ServiceType); None: ClusterIP."
    )
    rayStartParams: RayStartParams = Field(
        description="Options of the head's `ray start`, every value a string."
    )
    template: dict[str, Any] = Field(
        description="The head pod's core PodTemplateSpec, checked against the Kubernetes schema "
        "on its own (pod_templates)."
    )


class WorkerGroupSpec(_Strict):
    """KubeRay's ``WorkerGroupSpec``: a group of like worker pods the Ray autoscaler scales
    between ``minReplicas`` and ``maxReplicas``."""

    groupName: str = Field(
        description="The group's name, unique in the cluster: a DNS-1123 label (it names pods)."
    )
    replicas: int = Field(ge=0, le=INT32_MAX, description="Pods at start.")
    minReplicas: int = Field(
        ge=0, le=INT32_MAX, description="Fewest pods the autoscaler keeps; <= replicas."
    )
    maxReplicas: int = Field(
        ge=0, le=INT32_MAX, description="Most pods the autoscaler makes; >= replicas."
    )
    rayStartParams: RayStartParams = Field(
        description="Options of each worker's `ray start`, every value a string."
    )
    template: dict[str, Any] = Field(
        description="The group's core PodTemplateSpec, checked against the Kubernetes schema on "
        "its own (pod_templates)."
    )

    @field_validator("groupName")
    @classmethod
    def _group_name_is_dns_1123_label(cls, group_name: str) -> str:
        return _dns_label(
            group_name,
            what="DNS-1123 label",
            pattern=_DNS_1123_LABEL,
            max_chars=DNS_LABEL_MAX_CHARS,
        )

    # Fields are validated in the order declared, so each check sees the counts before it in
    # info.data (absent where that count was itself invalid).
    @field_validator("minReplicas")
    @classmethod
    def _min_at_most_replicas(cls, min_replicas: int, info: ValidationInfo) -> int:
        replicas = info.data.get("replicas")
        if replicas is not None and min_replicas > replicas:
            raise ValueError(
                f"minReplicas {min_replicas} is above replicas {replicas} "
                "(need 0 <= minReplicas <= replicas <= maxReplicas)"
            )
        return min_replicas

    @field_validator("maxReplicas")
    @classmethod
    def _max_at_least_min_and_replicas(cls, max_replicas: int, info: ValidationInfo) -> int:
        above = [
            f"{count} {info.data[count]}"
            for count in ("minReplicas", "replicas")
            if info.data.get(count) is not None and info.data[count] > max_replicas
        ]
        if above:
            raise ValueError(
                f"maxReplicas {max_replicas} is below {' and '.join(above)} "
                "(need 0 <= minReplicas <= replicas <= maxReplicas)"
            )
        return max_replicas


class RayClusterSpec(_Strict):
    """KubeRay's ``RayClusterSpec``: the head, the worker groups and how the cluster scales."""

    rayVersion: str = Field(
        min_length=1,
        description="The Ray version the images run (2.60.0); KubeRay picks version-dependent "
        "behaviour by it, the default autoscaler among them.",
    )
    enableInTreeAutoscaling: bool = Field(
        description="Whether KubeRay adds the Ray autoscaler to the head pod, which then scales "
        "each worker group between its minReplicas and maxReplicas."
    )
    autoscalerOptions: AutoscalerOptions | None = Field(
        None, description="The autoscaler's settings; None: KubeRay's defaults."
    )
    gcsFaultToleranceOptions: GcsFaultToleranceOptions | None = Field(
        None, description="GCS fault tolerance through Redis; None: the GCS state lives in memory."
    )
    authOptions: AuthOptions | None = Field(
        None, description="Ray's own authentication; None: none (KubeRay's default)."
    )
    headGroupSpec: HeadGroupSpec = Field(description="The head pod.")
    workerGroupSpecs: list[WorkerGroupSpec] = Field(
        description="The worker groups, names unique and none named headgroup."
    )

    @field_validator("workerGroupSpecs")
    @classmethod
    def _group_names_unique(cls, groups: list[WorkerGroupSpec]) -> list[WorkerGroupSpec]:
        first_index: dict[str, int] = {}
        for index, group in enumerate(groups):
            if group.groupName == HEAD_GROUP:
                raise ValueError(f"groupName {HEAD_GROUP!r} (group {index}) is the head's group")
            if group.groupName in first_index:
                first = first_index[group.groupName]
                raise ValueError(
                    f"groupName {group.groupName!r} is used by groups {first} and {index}: worker "
                    "group names must be unique"
                )
            first_index[group.groupName] = index
        return groups


class RayCluster(_Strict):
    """A KubeRay ``RayCluster`` (``ray.io/v1``) as Loom renders it."""

    apiVersion: Literal["ray.io/v1"] = Field(description="The KubeRay API group and version.")
    kind: Literal["RayCluster"] = Field(description="The object's kind.")
    metadata: ObjectMeta = Field(description="Name, namespace, labels and annotations.")
    spec: RayClusterSpec = Field(description="The cluster KubeRay makes and keeps.")


def _describe(error: ValidationError) -> str:
    """Each pydantic error as ``path: message``, e.g.
    ``spec.workerGroupSpecs.0.replica: unknown field (...)``."""
    lines: list[str] = []
    for detail in error.errors():
        path = ".".join(str(part) for part in detail["loc"]) or "(the object)"
        if detail["type"] == "extra_forbidden":
            message = "unknown field (Loom's model of ray.io/v1 RayCluster has no such field)"
        else:
            # a value error's message already quotes the value; a missing field has none
            message = detail["msg"].removeprefix("Value error, ")
            if detail["type"] not in ("value_error", "missing"):
                got = repr(detail["input"])
                message += f", got {got if len(got) <= 80 else got[:77] + '...'}"
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def validate_raycluster(obj: dict[str, Any]) -> RayCluster:
    """``obj`` (a RayCluster as parsed from YAML or JSON) as a ``RayCluster``; raises
    ``KubeRayError`` naming the path of every field that is unknown, missing or wrong."""
    try:
        return RayCluster.model_validate(obj)
    except ValidationError as error:
        raise KubeRayError(_describe(error)) from error


def pod_templates(raycluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each group's pod template, the head's first (as ``HEAD_GROUP``), then the worker groups in
    order: core ``PodTemplateSpec``s this model leaves untyped, for a caller to check against the
    Kubernetes schemas wrapped in a ``v1 PodTemplate``. Raises ``KubeRayError`` as
    ``validate_raycluster`` does."""
    spec = validate_raycluster(raycluster).spec
    return [
        (HEAD_GROUP, spec.headGroupSpec.template),
        *((group.groupName, group.template) for group in spec.workerGroupSpecs),
    ]
