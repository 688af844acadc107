"""Reading the monitoring sidecars as Prometheus does: ask the gateway for the targets
(``GET /v1/admin/targets``), then scrape each sidecar's ``/metrics``. For ``loom top``, the
benchmarks and the tests; Prometheus itself is configured with the same endpoint.

    text = scrape_sidecars("http://127.0.0.1:8000")
    total(text, "loom_inputs_total", model="minilm")      # summed over replicas
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from serving.monitoring.targets import sidecar_targets

FETCH_TIMEOUT_S = 10.0


def fetch_text(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> str:
    """The body of a GET of ``url``, as text (``urllib``'s errors raised as they come)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as answer:  # noqa: S310
        body: bytes = answer.read()
    return body.decode()


def sidecar_urls(
    gateway_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> list[str]:
    """The metrics URL of every sidecar the gateway lists (an admin key when keys are on)."""
    answer = fetch_text(
        f"{gateway_url.rstrip('/')}/v1/admin/targets",
        headers=headers,
        context=context,
        timeout_s=timeout_s,
    )
    return [target.url for target in sidecar_targets(json.loads(answer))]


def scrape_sidecars(
    gateway_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> str:
    """Every listed sidecar's Prometheus text, one after the other (one that does not answer
    is skipped: a target down)."""
    texts = []
    for url in sidecar_urls(gateway_url, headers=headers, context=context, timeout_s=timeout_s):
        try:
            texts.append(fetch_text(url, timeout_s=timeout_s))
        except OSError:
            continue
    return "".join(texts)


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = labels.items()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )
