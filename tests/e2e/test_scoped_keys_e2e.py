"""Issue 13's opening cases, on the keyed server with two named keys: team-a (infer, jobs)
and team-b (jobs). Each case that went through before is now refused with its status."""

from __future__ import annotations

import httpx
from loom_process import TEAM_A_KEY, TEAM_B_KEY, LoomProcess

A = {"Authorization": f"Bearer {TEAM_A_KEY}"}
B = {"Authorization": f"Bearer {TEAM_B_KEY}"}


def error(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_two_keys_walk_the_opening_cases(keyed_server: LoomProcess) -> None:
    url = keyed_server.url
    # any key could replace a served model: a job named after it, or promoting, needs models
    named = httpx.post(f"{url}/v1/jobs", json={"name": "digits", "trainer": "digits"}, headers=A)
    assert named.status_code == 403, named.text
    assert (error(named)["code"], error(named)["param"]) == ("insufficient_scope", "models")
    promoting = {"name": "team-a-lm", "trainer": "lm", "promote": True}
    assert httpx.post(f"{url}/v1/jobs", json=promoting, headers=A).status_code == 403
    promote = httpx.post(f"{url}/v1/admin/models/digits/promote", json={"version": "1"}, headers=A)
    assert (promote.status_code, error(promote)["param"]) == (403, "models")

    # no job ownership: B neither lists, reads, follows nor cancels A's job
    job = httpx.post(f"{url}/v1/jobs", json={"name": "team-a-lm", "trainer": "lm"}, headers=A)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert job.json()["owner"] == "team-a"
    listed = httpx.get(f"{url}/v1/jobs", headers=B).json()["data"]
    assert job_id not in [j["id"] for j in listed]
    for path in ("", "/logs", "/events"):
        theirs = httpx.get(f"{url}/v1/jobs/{job_id}{path}", headers=B, timeout=10)
        assert (theirs.status_code, error(theirs)["code"]) == (404, "job_not_found"), path
    cancel = httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=B)
    assert cancel.status_code == 404
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=A).json()["state"] != "cancelled"
    assert httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=A).status_code == 200

    # idempotency keys are per key: B's "nightly" is not A's
    spec = {"name": "nightly-lm", "trainer": "lm"}
    first = httpx.post(f"{url}/v1/jobs", json=spec, headers={**A, "Idempotency-Key": "nightly"})
    other = httpx.post(
        f"{url}/v1/jobs", json={**spec, "priority": 1}, headers={**B, "Idempotency-Key": "nightly"}
    )
    assert (first.status_code, other.status_code) == (201, 201)
    for answer, key in ((first, A), (other, B)):
        httpx.post(f"{url}/v1/jobs/{answer.json()['id']}/cancel", headers=key)

    # a key without a route's scope: B has no infer; an empty bearer is no key
    embed = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, headers=B)
    assert (embed.status_code, error(embed)["param"]) == (403, "infer")
    # (httpx will not send "Bearer " with its trailing space; the unit tests send it)
    empty = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer"})
    assert (empty.status_code, error(empty)["code"]) == (401, "missing_api_key")
    shards = httpx.get(f"{url}/v1/admin/shards", headers=A)
    assert (shards.status_code, error(shards)["param"]) == (403, "admin")

    # no limits per caller: a priority past the ceiling, a sweep of 140,000 members, a
    # max_steps of a billion, a job larger than training's share of the cluster: each a 422
    # naming its field, before anything is queued
    refusals = {
        "priority": {"name": "p", "trainer": "lm", "priority": 90},
        "hyperparameters.arch": {
            "name": "sweep", "trainer": "digits", "hyperparameters": {"arch": ["mlp"] * 140_000}
        },
        "hyperparameters.max_steps": {
            "name": "long", "trainer": "lm", "hyperparameters": {"max_steps": 10**9}
        },
        "resources.cpu": {"name": "big", "trainer": "lm", "workers": 256},
    }  # fmt: skip
    before = len(httpx.get(f"{url}/v1/jobs", headers=B).json()["data"])
    for field, spec in refusals.items():
        refused = httpx.post(f"{url}/v1/jobs", json=spec, headers=B, timeout=30)
        assert refused.status_code == 422, (field, refused.text)
        assert field in [f["field"] for f in error(refused)["fields"]], (field, refused.text)
    assert len(httpx.get(f"{url}/v1/jobs", headers=B).json()["data"]) == before  # none queued
