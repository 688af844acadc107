"""``loom top`` in a real terminal: tmux runs it against a running server, the test reads the
pane, presses a key and reads how the process ended."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from loom_process import REPO, LoomProcess

TMUX = shutil.which("tmux")
LOOM = REPO / ".venv" / "bin" / "loom"
DEADLINE_S = 60.0
"""How long the pane may take to show the table, or the process to end: generous, as the
machine is shared with the server; nothing is asserted about how long it took."""

RECORD_EXIT = (
    "import signal, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the child's to handle\n"
    "code = child.wait()\n"
    "open(sys.argv[1], 'w').write(str(code))\n"
    "sys.exit(code)\n"
)
"""Runs a command and writes its exit status to a file (negative: the signal that ended
it). tmux 3.3a's ``#{pane_dead_status}`` is not enough alone: here it stayed empty for
about half of 40 panes whose process had exited 1 (dead pane, no status), so the test
takes the status from this file and checks tmux's wherever tmux has one."""

pytestmark = pytest.mark.skipif(
    TMUX is None, reason="tmux is not installed (loom top's terminal test drives it in tmux)"
)


class Tmux:
    """One private tmux server (its own socket, in the test's folder), with
    ``remain-on-exit`` on from its config, so a pane whose process ended stays to be read."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = str(tmp_path / "tmux.sock")
        self.config = tmp_path / "tmux.conf"
        self.config.write_text("set-option -g remain-on-exit on\n")

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        assert TMUX is not None
        done = subprocess.run(
            [TMUX, "-S", self.socket, "-f", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def pane(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def pane_dead(self) -> tuple[bool, str]:
        """Whether the pane's process ended, and its status as tmux reports it ("" if none)."""
        dead, _, status = (
            self.run("display-message", "-p", "-t", "top", "#{pane_dead}|#{pane_dead_status}")
            .strip()
            .partition("|")
        )
        return dead == "1", status

    def kill(self) -> None:
        assert TMUX is not None
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


def wait_for(what: str, found: Callable[[], object], describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if found():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} within {DEADLINE_S:.0f} s; the pane:\n{describe()}")


@pytest.mark.parametrize("quit_key", ["q", "C-c"], ids=["q", "ctrl-c"])
def test_loom_top_shows_the_served_model_then_quits_cleanly_on_a_key(
    loom_server: LoomProcess, tmp_path: Path, quit_key: str
) -> None:
    loom = [str(LOOM)] if LOOM.exists() else [sys.executable, "-m", "loom"]
    exit_file = tmp_path / "exit-status"
    command = [sys.executable, "-c", RECORD_EXIT, str(exit_file), *loom, "top"]
    env = {k: v for k, v in os.environ.items() if k != "LOOM_API_KEYS"}  # keys are off
    tmux = Tmux(tmp_path)
    try:
        tmux.run(
            "new-session", "-d", "-s", "top", "-x", "160", "-y", "40", "-c", str(REPO),
            "--", *command, "--url", loom_server.url,
            env=env,
        )  # fmt: skip
        wait_for(
            "loom top did not show the served model `minilm`",
            lambda: tmux.pane_dead()[0] or "minilm" in tmux.pane(),
            tmux.pane,
        )
        assert not tmux.pane_dead()[0], f"loom top exited early; the pane:\n{tmux.pane()}"
        tmux.run("send-keys", "-t", "top", quit_key)
        wait_for("loom top did not exit", lambda: tmux.pane_dead()[0], tmux.pane)
        # the pane closes when its last process has gone: the file was written before
        assert exit_file.read_text() == "0", tmux.pane()
        assert tmux.pane_dead()[1] in ("0", ""), tmux.pane()  # "": tmux lost it (above)
        assert "Traceback" not in tmux.pane()
    finally:
        tmux.kill()
