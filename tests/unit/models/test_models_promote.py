"""``loom models promote NAME VERSION``: moves the alias serving follows, refuses unknowns."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from models import cli
from models.store import ModelStore

MakeModelDir = Callable[..., Path]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_model_dir: MakeModelDir):
    home = tmp_path / "home"
    monkeypatch.setenv("LOOM_HOME", str(home))
    store = ModelStore(home / "models")
    store.register("enc", make_model_dir(), task="embed")
    store.register("enc", make_model_dir(seed=1), task="embed")
    store.set_alias("enc", "serving", "1")
    return store


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loom")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_promote_moves_the_serving_alias(store: ModelStore, capsys) -> None:
    assert run_cli("models", "promote", "enc", "2") == 0
    assert store.aliases("enc") == {"serving": "2"}
    assert "promoted enc@2 (serving: 1 -> 2)" in capsys.readouterr().out


def test_promote_can_move_another_alias(store: ModelStore) -> None:
    assert run_cli("models", "promote", "enc", "2", "--alias", "canary") == 0
    assert store.aliases("enc") == {"canary": "2", "serving": "1"}


def test_promoting_the_current_version_says_so(store: ModelStore, capsys) -> None:
    assert run_cli("models", "promote", "enc", "1") == 0
    assert "already points at version 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("enc", "7", "model enc has no version '7' (versions: 1, 2)"),
        ("nope", "1", "no model named 'nope'"),
        ("enc", "../1", "invalid model version '../1'"),
    ],
)
def test_promote_refuses_an_unknown_model_or_version_clearly(
    store: ModelStore, capsys, name, version, message
) -> None:
    assert run_cli("models", "promote", name, version) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err
    assert store.aliases("enc") == {"serving": "1"}
