"""Scoped keys (issue 13, point 1): each key is a principal with scopes; each route needs the
scope ``scopes.ROUTE_SCOPES`` names, else 403 ``insufficient_scope`` naming it; a missing,
empty or unknown key is 401; with no keys the one local caller holds every scope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL
from live_gateway import gateway_core
from prometheus_client import REGISTRY
from starlette.responses import JSONResponse, Response

from models.settings import LoomEnv
from serving.config import ConfigError, default_config, parse_config, with_overrides
from serving.config.key_file import KeyFileError, create_key, key_entries, read_key_file, revoke_key
from serving.config.server import ApiKeyConfig, ServerConfig
from serving.gateway.app import build_http_app
from serving.gateway.endpoint import Endpoints, Scope
from serving.gateway.keys import KeyCheck, hash_server_keys, key_digest
from serving.gateway.routes.jobs import served_store_names
from serving.gateway.scopes import ROUTE_SCOPES
from training.callers import SCOPES, Caller

KEYS = {scope: f"{scope}-key-0123456789" for scope in SCOPES}
SERVER = {"keys": [{"name": f"{s}-bot", "key": KEYS[s], "scopes": [s]} for s in SCOPES]}
EMBED = {"model": "enc", "input": "hi"}

REQUESTS: dict[str, tuple[str, str, Any]] = {
    "embeddings": ("POST", "/v1/embeddings", EMBED),
    "completions": ("POST", "/v1/completions", {"model": "gen", "prompt": "a", "max_tokens": 1}),
    "chat_completions": (
        "POST",
        "/v1/chat/completions",
        {"model": "gen", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1},
    ),
    "models": ("GET", "/v1/models", None),
    "v2_metadata": ("GET", "/v2", None),
    "v2_model": ("GET", "/v2/models/enc", None),
    "v2_ready": ("GET", "/v2/models/enc/ready", None),
    "v2_infer": ("POST", "/v2/models/enc/infer", {"inputs": []}),
    "jobs": ("GET", "/v1/jobs", None),
    "admin_promote": ("POST", "/v1/admin/models/enc/promote", {"version": "1"}),
    "admin_shards": ("GET", "/v1/admin/shards", None),
    "admin_reshard": ("POST", "/v1/admin/shards/enc", {"shards": 2}),
    "admin_targets": ("GET", "/v1/admin/targets", None),
}
"""One request per keyed route: the table below is tested route by route."""
ANY_KEY_ROUTES = {"status", "openapi"}
UNKEYED_ROUTES = {"metrics", "v2_live", "v2_ready_all"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def http(tmp_path: Path) -> TestClient:
    return TestClient(build_http_app(gateway_core(tmp_path, **SERVER)), base_url=LOOPBACK_URL)


def call(http: TestClient, route: str, headers: dict[str, str]) -> Any:
    method, path, body = REQUESTS[route]
    return http.request(method, path, json=body, headers=headers)


def test_the_scope_table_covers_every_keyed_route_of_the_gateway(tmp_path: Path) -> None:
    app = build_http_app(gateway_core(tmp_path, **SERVER))
    names = {
        getattr(route, "name", None)
        for route in app.routes
        if not getattr(route, "path", "/v1/jobs").startswith("/v1/jobs")  # the router: "jobs"
    } - {None, "docs", "redoc", "swagger_ui_redirect", "openapi"}
    assert names - ANY_KEY_ROUTES - UNKEYED_ROUTES == set(ROUTE_SCOPES) - {"jobs"}
    assert set(REQUESTS) == set(ROUTE_SCOPES)


@pytest.mark.parametrize("route", sorted(ROUTE_SCOPES))
@pytest.mark.parametrize("held", SCOPES)
def test_each_route_answers_a_key_by_its_scope(http: TestClient, route: str, held: str) -> None:
    needed = ROUTE_SCOPES[route]
    response = call(http, route, bearer(KEYS[held]))
    if held in (needed, "admin"):  # admin holds every scope
        assert response.status_code not in (401, 403), response.text
        return
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert f"'{needed}' scope" in message
    if not isinstance(error, str):  # OpenAI's shape names it in code and param; v2's is a string
        assert (error["code"], error["param"]) == ("insufficient_scope", needed)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer "}, "missing_api_key"),  # an empty key is no key
        ({"Authorization": "Bearer    "}, "missing_api_key"),
        ({"Authorization": f"Basic {KEYS['admin']}"}, "missing_api_key"),
        (bearer(KEYS["admin"] + "x"), "invalid_api_key"),
        (bearer(KEYS["admin"][:-1]), "invalid_api_key"),
    ],
)
def test_a_missing_empty_or_unknown_key_is_401(http: TestClient, headers, code) -> None:
    response = http.post("/v1/embeddings", json=EMBED, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def test_any_key_may_read_status_and_no_key_is_needed_for_health(http: TestClient) -> None:
    assert http.get("/v1/status", headers=bearer(KEYS["jobs"])).status_code == 200
    assert http.get("/v1/status").status_code == 401
    assert http.get("/v2/health/live").status_code == 200


def test_without_keys_the_local_caller_holds_every_scope(tmp_path: Path) -> None:
    http = TestClient(build_http_app(gateway_core(tmp_path)), base_url=LOOPBACK_URL)
    for route in ROUTE_SCOPES:
        assert call(http, route, {}).status_code not in (401, 403), route
    job = http.post("/v1/jobs", json={"name": "tiny-lm", "trainer": "lm"}).json()
    assert job["owner"] == "local"


def test_requests_are_counted_by_principal_and_route_family(http: TestClient) -> None:
    labels = {"principal": "infer-bot", "route_family": "infer"}
    before = REGISTRY.get_sample_value("loom_requests_by_principal_total", labels) or 0.0
    http.post("/v1/embeddings", json=EMBED, headers=bearer(KEYS["infer"]))
    http.get("/v1/jobs", headers=bearer(KEYS["infer"]))  # 403, counted under "jobs"
    after = REGISTRY.get_sample_value("loom_requests_by_principal_total", labels)
    assert after == before + 1
    refused = {"principal": "infer-bot", "route_family": "jobs"}
    assert (REGISTRY.get_sample_value("loom_requests_by_principal_total", refused) or 0) >= 1


def test_a_handler_is_given_the_caller(tmp_path: Path) -> None:
    core = gateway_core(tmp_path, **SERVER)
    app = FastAPI()

    @Endpoints(app, core).get("/whoami", "status")
    async def whoami(scope: Scope) -> Response:
        caller = scope.caller
        return JSONResponse({"principal": caller.principal, "scopes": sorted(caller.scopes)})

    http = TestClient(app, base_url=LOOPBACK_URL)
    answer = http.get("/whoami", headers=bearer(KEYS["models"])).json()
    assert answer == {"principal": "models-bot", "scopes": ["models"]}


# ---- where keys come from, and how they are held ------------------------------------------------


@pytest.mark.parametrize(
    "server",
    [
        {"api_keys": ["fifteen-chars!!"]},  # 15 characters
        {"admin_api_keys": ["short"]},
        {"keys": [{"name": "a", "key": "x" * 15, "scopes": ["infer"]}]},
    ],
)
def test_a_key_shorter_than_16_characters_is_refused(server: dict) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        ServerConfig.model_validate(server)


def test_a_short_key_from_the_environment_is_refused_without_echoing_it(tmp_path: Path) -> None:
    env = LoomEnv.from_environ({"LOOM_HOME": str(tmp_path), "LOOM_API_KEYS": "tiny-secret"})
    with pytest.raises(ConfigError, match="at least 16 characters") as refused:
        with_overrides(default_config(cpus=1), env=env)
    assert "tiny-secret" not in str(refused.value)


def test_older_keys_map_to_numbered_principals_with_their_scopes() -> None:
    server = ServerConfig(api_keys=("a" * 16, "b" * 16), admin_api_keys=("c" * 16,))
    entries = [(e.name, e.scopes) for e in server.principal_keys()]
    assert entries == [
        ("api-key-1", ("infer", "jobs", "models")),
        ("api-key-2", ("infer", "jobs", "models")),
        ("admin-key-1", ("admin",)),
    ]


def test_a_key_name_may_not_repeat() -> None:
    same = {"name": "api-key-1", "key": "z" * 16, "scopes": ["infer"]}
    with pytest.raises(ValueError, match="unique"):
        ServerConfig.model_validate({"api_keys": ["a" * 16], "keys": [same]})


def test_the_gateway_is_given_digests_that_name_each_principal() -> None:
    unsalted = key_digest("hashed-key-0123456789", b"").hex()
    server = ServerConfig.model_validate(
        {
            "keys": [
                {"name": "app", "key": "plain-key-0123456789", "scopes": ["infer"]},
                {"name": "ops", "key_sha256": unsalted, "scopes": ["admin"]},
            ],
            "api_keys": ["legacy-key-0123456789"],
        }
    )
    hashed = hash_server_keys(server)
    text = json.dumps(hashed.model_dump())
    assert "plain-key-0123456789" not in text
    assert "legacy-key-0123456789" not in text
    keys = KeyCheck.from_digests(ServerConfig.model_validate(hashed.model_dump()))
    assert keys.identify("plain-key-0123456789") == Caller("app", frozenset({"infer"}))
    assert keys.identify("hashed-key-0123456789") == Caller("ops", frozenset({"admin"}))
    legacy = keys.identify("legacy-key-0123456789")
    assert legacy is not None
    assert legacy.principal == "api-key-1"
    assert keys.identify("") is None
    assert keys.identify("plain-key-012345678") is None


def test_the_key_file_holds_salted_hashes_and_the_server_takes_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "ci-bot", ["infer", "jobs"])
    assert len(key) >= 40  # 32 random bytes, url-safe base64
    assert key not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0  # its owner's only
    assert [(e["name"], e["scopes"]) for e in key_entries(path)] == [("ci-bot", ["infer", "jobs"])]

    config = with_overrides(
        default_config(cpus=1), env=LoomEnv.from_environ({"LOOM_HOME": str(tmp_path)})
    )
    assert config.server.keys_on
    keys = KeyCheck.hashing(config.server)
    assert keys.identify(key) == Caller("ci-bot", frozenset({"infer", "jobs"}))

    assert revoke_key(path, "ci-bot")
    assert read_key_file(path) == ()
    assert not revoke_key(path, "ci-bot")


def test_the_key_file_refuses_a_taken_name_or_an_unknown_scope(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    create_key(path, "ci-bot", ["infer"])
    with pytest.raises(KeyFileError, match="exists"):
        create_key(path, "ci-bot", ["jobs"])
    with pytest.raises(ValueError, match="scopes"):
        create_key(path, "other", ["root"])
    assert [e.name for e in read_key_file(path)] == ["ci-bot"]


def test_an_api_key_entry_needs_exactly_one_of_key_and_key_sha256() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ApiKeyConfig.model_validate({"name": "a", "scopes": ["infer"]})
    with pytest.raises(ValueError, match="64 hex"):
        ApiKeyConfig.model_validate({"name": "a", "key_sha256": "abc", "scopes": ["infer"]})


@pytest.mark.parametrize(("held", "status"), [("jobs", 403), ("models", 403), ("admin", 201)])
def test_through_the_gateway_a_job_named_after_a_served_model_needs_models(
    http: TestClient, held: str, status: int
) -> None:
    # "digits" is served (live_gateway's MODELS): a digits job named so would replace it. A
    # models-only key lacks "jobs" itself; admin holds both
    spec = {"name": "digits", "trainer": "lm"}
    response = http.post("/v1/jobs", json=spec, headers=bearer(KEYS[held]))
    assert response.status_code == status, response.text
    if held == "jobs":
        assert response.json()["error"]["param"] == "models"
    if held == "models":
        assert response.json()["error"]["param"] == "jobs"


def test_served_store_names_include_each_served_models_source() -> None:
    config = parse_config(
        {
            "models": [
                {"name": "prod", "source": "enc-store#serving", "task": "embed"},
                {"name": "mini", "source": "minilm@1", "task": "embed"},
            ]
        }
    )
    assert served_store_names(config) == {"prod", "enc-store", "mini", "minilm"}
