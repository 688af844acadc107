"""``POST /v1/admin/models/{name}/promote`` over the gateway's routes, with no Ray: admin keys,
unknown names, pinned models, and the alias it moves in the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL
from safetensors.torch import save_file

from models.store import ModelStore
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.rollout.route_table import RouteFollower

ADMIN = {"Authorization": "Bearer admin-key-0123456789"}
USER = {"Authorization": "Bearer user-key-0123456789"}
INFER_ONLY = {"Authorization": "Bearer infer-key-0123456789"}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    folder = tmp_path / "enc-files"
    folder.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    store = ModelStore(tmp_path / "models")
    store.register("enc", folder, task="embed")  # version 1
    store.register("enc", folder, task="embed")  # version 2
    store.set_alias("enc", "serving", "1")
    return store


def client(store: ModelStore, **server: object) -> TestClient:
    config = parse_config(
        {
            "server": server,
            "models": [
                {"name": "enc", "source": "enc"},
                {"name": "beta", "source": "enc#beta"},
                {"name": "pinned", "source": "enc@1"},
                {"name": "canary", "source": "enc", "traffic": {"1": 9, "2": 1}},
            ],
        }
    )

    async def never(*args: object) -> None:
        return None

    return TestClient(
        build_http_app(GatewayCore(config, RouteFollower(never), store)), base_url=LOOPBACK_URL
    )


@pytest.fixture
def keyed(store: ModelStore) -> TestClient:
    return client(
        store,
        api_keys=["user-key-0123456789"],
        admin_api_keys=["admin-key-0123456789"],
        keys=[{"name": "app", "key": "infer-key-0123456789", "scopes": ["infer"]}],
    )


def promote(http: TestClient, name: str, body: object, headers: dict[str, str] | None = None):
    return http.post(f"/v1/admin/models/{name}/promote", json=body, headers=headers or {})


def test_an_admin_key_moves_the_serving_alias(keyed: TestClient, store: ModelStore) -> None:
    response = promote(keyed, "enc", {"version": "2"}, ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model": "enc",
        "store_model": "enc",
        "alias": "serving",
        "version": "2",
        "previous": "1",
    }
    assert store.aliases("enc") == {"serving": "2"}


def test_a_model_following_a_named_alias_moves_that_alias(
    keyed: TestClient, store: ModelStore
) -> None:
    assert promote(keyed, "beta", {"version": "2"}, ADMIN).status_code == 200
    assert store.aliases("enc") == {"beta": "2", "serving": "1"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        (INFER_ONLY, 403, "insufficient_scope"),  # a good key, without the models scope
    ],
)
def test_without_the_models_scope_promote_is_refused(
    keyed: TestClient, store: ModelStore, headers, status, code
) -> None:
    response = promote(keyed, "enc", {"version": "2"}, headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert store.aliases("enc") == {"serving": "1"}  # nothing moved


def test_an_admin_key_is_also_an_api_key_for_the_other_routes(keyed: TestClient) -> None:
    assert keyed.get("/v1/models", headers=ADMIN).status_code == 200


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "param"),
    [
        ("nope", {"version": "2"}, 404, "model_not_found", "model"),
        ("enc", {"version": "7"}, 404, "version_not_found", "version"),
        ("enc", {"version": "../1"}, 400, "invalid_request", "version"),
        ("enc", {"version": ""}, 400, "invalid_request", "version"),
        ("enc", {}, 400, "invalid_request", "version"),
        ("enc", {"version": "2", "extra": 1}, 400, "invalid_request", "extra"),
        ("pinned", {"version": "2"}, 409, "model_pinned", None),
        ("canary", {"version": "2"}, 409, "model_pinned", None),
    ],
)
def test_bad_promotions_answer_in_openai_shape_and_move_nothing(
    keyed: TestClient, store: ModelStore, name, body, status, code, param
) -> None:
    response = promote(keyed, name, body, ADMIN)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"]  # OpenAI's shape: message, type, param, code
    assert store.aliases("enc") == {"serving": "1"}


def test_with_no_keys_at_all_the_admin_route_is_open_like_every_route(store: ModelStore) -> None:
    response = promote(client(store), "enc", {"version": "2"})
    assert response.status_code == 200
    assert store.aliases("enc") == {"serving": "2"}


def test_a_model_with_no_version_routed_yet_answers_503_not_500(store: ModelStore) -> None:
    response = client(store).post("/v1/embeddings", json={"model": "enc", "input": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_not_ready"
    assert response.headers["retry-after"] == "1"


def test_an_api_keys_key_holds_the_models_scope_so_it_may_promote(
    keyed: TestClient, store: ModelStore
) -> None:
    # server.api_keys map to principals with infer, jobs and models (docs/security.md)
    assert promote(keyed, "enc", {"version": "2"}, USER).status_code == 200
    assert store.aliases("enc") == {"serving": "2"}
