"""A model whose source does not resolve in the store yet (configured before its first version,
the usual first step of train -> serve) waits: it is left out of the rollout with the reason
published for its callers, the rest serve, and the tick that first resolves it starts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rollout_fakes import FakeApps, FakeBoard, actions, reconciler
from safetensors.torch import save_file

from models.errors import ModelNotFound, StoreError
from models.store import ModelStore
from serving.config import ModelConfig, parse_config
from serving.rollout.plan import AppState, VersionKey, unresolved_reason
from serving.rollout.reconciler import AppStatus
from serving.server import check_sources


class Store:
    """Versions and aliases by model, resolved the way ``ModelStore.resolve`` does: ``NAME@V``
    must exist, ``NAME#A`` must be set, ``NAME`` is the serving alias else the latest."""

    def __init__(self) -> None:
        self.versions: dict[str, list[str]] = {}
        self.aliases: dict[str, dict[str, str]] = {}
        self.broken: dict[str, Exception] = {}
        self.reads = 0

    def resolve(self, source: str) -> str:
        self.reads += 1
        name, _, version = source.partition("@")
        name, _, alias = name.partition("#")
        if name in self.broken:
            raise self.broken[name]
        known = self.versions.get(name, [])
        if version:
            if version not in known:
                raise ModelNotFound(f"model {name} has no version {version!r}")
            return version
        if alias:
            if alias not in self.aliases.get(name, {}):
                raise ModelNotFound(f"model {name} has no alias {alias!r}")
            return self.aliases[name][alias]
        if not known:
            raise ModelNotFound(f"no model named {name!r} in the store at /srv/secret/models")
        return self.aliases.get(name, {}).get("serving", known[-1])


@pytest.fixture
def store() -> Store:
    return Store()


def events(apps: FakeApps) -> list[str]:
    return [line.removeprefix("event ") for line in apps.log if line.startswith("event")]


def test_a_model_with_no_version_waits_while_the_rest_deploy_and_serve(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    store.versions["ready"] = ["1"]
    models = [ModelConfig(name="ready", source="ready"), ModelConfig(name="later", source="later")]
    rec = reconciler(models, store, apps, board)

    rec.step()
    apps.set("ready", "1", AppState.RUNNING)
    rec.step()

    # the table that names only the waiting model, then the one that routes the other
    assert actions(apps) == ["deploy loom.ready@1", "publish ", "publish ready=1x1"]
    assert rec.routed == {"ready": {"1": 1.0}}
    reason = "later has no version in the model store yet"
    assert board.waiting[-1]["later"].startswith(reason)  # what its callers are told
    assert "/srv/secret" not in board.waiting[-1]["later"]  # no server path reaches a client
    assert rec.serving()  # start-up does not wait for it
    said = [e for e in events(apps) if e.startswith("later:")]
    assert said == [
        "later: later does not resolve in the store (no model named 'later' in the store at "
        "/srv/secret/models); not ready until it does"
    ]


def test_the_first_version_appearing_starts_it_and_clears_its_reason(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([ModelConfig(name="later", source="later#serving")], store, apps, board)
    rec.step()
    assert board.waiting[-1] == {
        "later": "alias 'serving' of later is not set in the model store yet"
    }

    store.versions["later"] = ["1"]  # a training job registers version 1 ...
    rec.step()
    assert actions(apps) == ["publish "]  # ... but the alias is what the source follows
    store.aliases["later"] = {"serving": "1"}  # promote: true moves the alias
    rec.step()
    apps.set("later", "1", AppState.RUNNING)
    rec.step()

    # once it resolves its reason is withdrawn at once (it is starting, not missing)
    assert actions(apps) == ["publish ", "deploy loom.later@1", "publish ", "publish later=1x1"]
    assert board.waiting[-2:] == [{}, {}]
    assert rec.waiting == {}
    assert rec.serving()


def test_waiting_is_a_settled_state_read_from_the_store_each_tick_and_said_once(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    calls: list[int] = []
    states = apps.states

    def counted_states() -> dict[VersionKey, AppStatus]:  # a controller call, counted
        calls.append(1)
        return states()

    apps.states = counted_states  # type: ignore[method-assign]
    rec = reconciler([ModelConfig(name="later", source="later")], store, apps, board)

    for _ in range(6):
        rec.step()

    assert len(board.tables) == 1  # published once, not each tick
    assert len(calls) == 2  # the first plan, then settled: Serve is not asked again
    assert store.reads == 6  # but the store is read every tick, so a new version is seen
    assert len([e for e in events(apps) if "does not resolve" in e]) == 1


def test_a_split_naming_a_version_not_stored_yet_waits_for_it(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    store.versions["m"] = ["3"]
    rec = reconciler(
        [ModelConfig(name="canary", source="m", traffic={"3": 90, "4": 10})], store, apps, board
    )

    rec.step()

    assert actions(apps) == ["publish "]  # nothing deployed: version 3 alone would be no split
    assert board.waiting[-1] == {"canary": "version 4 of m is not in the model store yet"}
    store.versions["m"].append("4")
    rec.step()
    assert actions(apps)[1:3] == ["deploy loom.canary@3", "deploy loom.canary@4"]


def test_a_pool_waits_until_every_member_it_pins_is_stored(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    config = parse_config(
        {
            "models": [
                {
                    "name": "pool",
                    "task": "classify",
                    "multiplex": {"models": ["a@1", "b@2"], "max_models_per_replica": 2},
                }
            ]
        }
    )
    store.versions["a"] = ["1"]
    rec = reconciler(config.deployed(), store, apps, board)

    rec.step()

    assert board.waiting[-1] == {"pool": "version 2 of b is not in the model store yet"}
    store.versions["b"] = ["2"]
    rec.step()
    assert actions(apps)[-2].startswith("deploy loom.pool@")
    assert board.waiting[-1] == {}


def test_every_shard_of_a_sharded_model_waits_with_the_same_reason(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    config = parse_config(
        {
            "models": [
                {
                    "name": "enc",
                    "source": "enc",
                    "task": "embed",
                    "sharding": {"shards": 2, "key": "header"},
                }
            ]
        }
    )
    rec = reconciler(config.deployed(), store, apps, board)

    rec.step()

    assert sorted(board.waiting[-1]) == ["enc~0", "enc~1"]
    assert len(set(board.waiting[-1].values())) == 1


@pytest.mark.parametrize(
    "error",
    [StoreError("/srv/models/m/aliases.json is a folder"), IsADirectoryError(21, "folder")],
)
def test_a_store_it_cannot_read_is_a_wait_said_once_never_a_failed_step(
    store: Store, apps: FakeApps, board: FakeBoard, error: Exception
) -> None:
    store.versions["ok"] = ["1"]
    store.broken["m"] = error
    rec = reconciler(
        [ModelConfig(name="m", source="m"), ModelConfig(name="ok", source="ok")],
        store,
        apps,
        board,
    )

    for _ in range(3):
        rec.step()  # raises nothing

    assert "deploy loom.ok@1" in actions(apps)
    assert board.waiting[-1] == {
        "m": "m cannot be read from the model store (the server log says why)"
    }
    assert len([e for e in events(apps) if e.startswith("m: m does not resolve")]) == 1


def test_start_up_waits_for_the_models_that_resolve_and_not_for_one_that_waits(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    store.versions["ready"] = ["1"]
    models = [ModelConfig(name="ready", source="ready"), ModelConfig(name="later", source="later")]
    rec = reconciler(models, store, apps, board)
    rec.step()
    apps.set("ready", "1", AppState.RUNNING)

    rec.wait_until_serving(timeout_s=60, interval_s=0)  # returns: no TimeoutError

    assert rec.routed == {"ready": {"1": 1.0}}
    assert rec.waiting == {
        "later": "later has no version in the model store yet (it serves "
        "its 'serving' alias, else its latest version, once one is registered)"
    }


def test_a_served_model_whose_alias_disappears_keeps_serving_and_does_not_wait(
    store: Store, apps: FakeApps, board: FakeBoard
) -> None:
    store.versions["m"] = ["1"]
    store.aliases["m"] = {"serving": "1"}
    rec = reconciler([ModelConfig(name="m", source="m#serving")], store, apps, board)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()
    del store.aliases["m"]["serving"]

    rec.step()

    assert rec.routed == {"m": {"1": 1.0}}
    assert rec.waiting == {}
    assert any("keeps serving what it serves" in e for e in events(apps))


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("digits", "digits has no version in the model store yet"),
        ("digits#serving", "alias 'serving' of digits is not set in the model store yet"),
        ("digits@3", "version 3 of digits is not in the model store yet"),
    ],
)
def test_the_reason_names_the_version_or_alias_that_is_missing(source: str, said: str) -> None:
    assert unresolved_reason(source, ModelNotFound("at /srv/x")).startswith(said)


def test_the_server_starts_with_sources_that_do_not_resolve_and_names_them(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "models": [
                {"name": "later", "source": "later", "task": "embed"},
                {"name": "canary", "source": "m", "task": "embed", "traffic": {"1": 50, "2": 50}},
            ]
        }
    )

    assert check_sources(config, ModelStore(tmp_path / "models")) == ["later", "canary"]


def test_a_real_store_holding_a_version_folder_named_aliases_json_breaks_no_step(
    tmp_path: Path, apps: FakeApps, board: FakeBoard
) -> None:
    """What an old store may hold: ``enc/aliases.json/`` (a version named like the store's
    file). The store answers a StoreError, so the model waits and the other one serves."""
    store = ModelStore(tmp_path / "models")
    source = tmp_path / "enc-src"
    source.mkdir()
    save_file({"w": torch.zeros(2)}, str(source / "model.safetensors"))
    store.register("enc", source, task="embed")
    store.register("ok", source, task="embed")
    (store.root / "enc" / "aliases.json").mkdir()
    models = [ModelConfig(name="enc", source="enc"), ModelConfig(name="ok", source="ok")]
    rec = reconciler(models, RealStore(store), apps, board)

    for _ in range(3):
        rec.step()

    assert actions(apps)[0] == "deploy loom.ok@1"
    assert rec.waiting == {
        "enc": "enc cannot be read from the model store (the server log says why)"
    }
    told = [e for e in events(apps) if e.startswith("enc:")]
    assert len(told) == 1
    assert "aliases.json is a folder" in told[0]


class RealStore:
    """``resolve`` as ``LoomServer`` builds it over a real store."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def resolve(self, source: str) -> str:
        return self.store.resolve(source).version
