"""``loom models list|show|register`` against a store under a temporary ``LOOM_HOME``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from models import cli

MakeModelDir = Callable[..., Path]


@pytest.fixture(autouse=True)
def loom_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LOOM_HOME", str(home))
    return home


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loom")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_register_then_list_json_shows_it_beside_the_bundled_model(
    make_model_dir: MakeModelDir, loom_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("models", "register", "enc", str(make_model_dir()), "--task", "embed") == 0
    registered = capsys.readouterr().out
    assert "registered enc@1" in registered
    assert "model.safetensors" in registered

    assert run_cli("models", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)

    assert [(m["name"], m["task"]) for m in listed] == [("enc", "embed"), ("minilm", "embed")]
    assert listed[1]["aliases"] == {"serving": "1"}
    assert (loom_home / "models" / "enc" / "1" / "manifest.json").is_file()


def test_list_prints_a_table_with_a_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("models", "list") == 0

    lines = capsys.readouterr().out.splitlines()

    assert lines[0].split() == ["NAME", "TASK", "VERSIONS", "ALIASES"]
    assert lines[1].split() == ["minilm", "embed", "1", "serving=1"]


def test_show_prints_versions_and_json_carries_the_manifest(
    make_model_dir: MakeModelDir, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli("models", "register", "enc", str(make_model_dir()), "--task", "classify")
    run_cli(
        "models",
        "register",
        "enc",
        str(make_model_dir(seed=1)),
        "--task",
        "classify",
        "--version",
        "7",
    )
    capsys.readouterr()

    assert run_cli("models", "show", "enc") == 0
    text = capsys.readouterr().out
    assert "task:    classify" in text
    assert "version: 7" in text

    assert run_cli("models", "show", "enc", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in shown["versions"]] == ["1", "7"]
    assert {f["path"] for f in shown["versions"][0]["files"]} >= {"model.safetensors"}


def test_a_store_error_prints_one_line_on_stderr_and_exits_1(
    make_model_dir: MakeModelDir, capsys: pytest.CaptureFixture[str]
) -> None:
    unsafe = make_model_dir(extra={"pytorch_model.bin": b"\x80\x04"})

    assert run_cli("models", "register", "enc", str(unsafe), "--task", "embed") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing 'pytorch_model.bin'")
    assert "Traceback" not in err

    assert run_cli("models", "show", "nope") == 1
    assert capsys.readouterr().err.startswith("error: no model named 'nope'")
