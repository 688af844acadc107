"""``GET /openapi.json``: every route of the app is in the document (the jobs router's and an
ensemble's literal routes included), it is a valid OpenAPI 3.1 document, it sits behind the
API keys when they are on and says which routes need one. No Ray, no sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL
from live_gateway import MODELS, gateway_core

from serving.gateway.app import build_http_app
from serving.gateway.routes.openapi import OPERATIONS, app_routes, undescribed

ENSEMBLE = {
    "name": "digits-pair",
    "task": "classify",
    "ensemble": {"members": ["digits", "digits-2"], "combine": "mean"},
}
KEY = "doc-key-0123456789"


def document(tmp_path: Path, **server: Any) -> tuple[Any, dict[str, Any]]:
    core = gateway_core(tmp_path, **server)
    app = build_http_app(core)
    headers = {"Authorization": f"Bearer {KEY}"} if server else {}
    answer = TestClient(app, base_url=LOOPBACK_URL).get("/openapi.json", headers=headers)
    assert answer.status_code == 200, answer.text
    return app, answer.json()


def test_every_route_of_the_app_is_described_in_the_document(tmp_path: Path) -> None:
    app, doc = document(tmp_path)
    routes = {(method.lower(), path) for method, path, _ in app_routes(app.routes)}
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    assert undescribed(app) == []
    # the walk found every family: OpenAI, v2, admin, jobs, monitoring and the document
    assert {("post", "/v1/embeddings"), ("post", "/v1/jobs"), ("get", "/metrics")} <= routes
    assert ("get", "/openapi.json") in routes
    # and every entry of the table describes a route that exists
    names = {name for _, _, name in app_routes(app.routes)}
    assert set(OPERATIONS) == names


def test_an_ensembles_literal_routes_are_in_the_document_each_with_its_own_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import live_gateway

    models = [*MODELS, {"name": "digits-2", "source": "digits-2", "task": "classify"}, ENSEMBLE]
    monkeypatch.setattr(live_gateway, "MODELS", models)
    app, doc = document(tmp_path)
    assert "/v2/models/digits-pair/infer" in doc["paths"]
    infer = doc["paths"]["/v2/models/digits-pair/infer"]["post"]
    assert infer["requestBody"] == doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert undescribed(app) == []


def test_the_document_is_valid_openapi_and_each_protocol_names_its_error_shape(
    tmp_path: Path,
) -> None:
    _, doc = document(tmp_path)
    schema = schemathesis.openapi.from_dict(doc)  # validates it as OpenAPI 3.1
    assert len([op for op in schema.get_all_operations() if op.ok()]) >= 20
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    embeddings = doc["paths"]["/v1/embeddings"]["post"]
    assert infer["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/V2Error"
    }
    assert embeddings["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    body = embeddings["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/EmbeddingsRequest"}
    submit = doc["components"]["schemas"]["JobSubmit"]
    assert {"lm", "digits"} <= set(submit["discriminator"]["mapping"])
    assert "security" not in embeddings  # keys off: nothing to say


def test_with_keys_on_the_document_needs_a_key_and_says_which_routes_do(tmp_path: Path) -> None:
    core = gateway_core(tmp_path, api_keys=[KEY])
    refused = TestClient(build_http_app(core), base_url=LOOPBACK_URL).get("/openapi.json")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_api_key"

    _, doc = document(tmp_path / "keyed", api_keys=[KEY])
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    paths = doc["paths"]
    assert paths["/v1/embeddings"]["post"]["security"] == [{"bearer": []}]
    assert "401" in paths["/v1/embeddings"]["post"]["responses"]
    assert paths["/v2/health/live"]["get"]["security"] == []
    assert paths["/metrics"]["get"]["security"] == []
    assert "403" in paths["/v1/admin/shards"]["get"]["responses"]
