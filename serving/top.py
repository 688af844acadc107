"""``loom top``: a live table of what a running server serves and how it is doing.

Each frame reads the gateway (``/v1/status``, ``/metrics``, ``/v1/admin/targets``) and the
monitoring sidecars its targets name, hands the samples to ``serving.top_view`` (which
computes the rows; no I/O there) and redraws. A read that fails is said on the table's
footer: without the gateway's status or metrics the table keeps its last values; without
the sidecars (none yet, a 404 from ``/v1/admin/targets``, or one unreachable) their columns
show ``-``. ``q`` or Ctrl-C quits with exit status 0 and the terminal as it was.

    client = GatewayClient("http://127.0.0.1:8000", api_key=None, ssl_context=None)
    run_top(client, interval_s=1.0)     # until q
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import ssl
import sys
import termios
import threading
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Protocol, TextIO

from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

from serving.monitoring.targets import sidecar_targets
from serving.top_view import (
    COLUMNS,
    Frame,
    ModelRow,
    Scrape,
    SeriesKey,
    ServedModel,
    TopState,
    advance,
    parse_metrics,
    row_cells,
    served_models,
)

TARGETS_PATH = "/v1/admin/targets"
SIDECAR_READERS = 8
"""Sidecars read at once: one unreachable sidecar costs a frame its timeout, not N of them."""


class FetchError(Exception):
    """One read failed; the message is the footer's line (``URL answered 404``)."""


@dataclass(frozen=True)
class GatewayClient:
    """Reads a running server the way ``loom status`` does: the first key of
    ``LOOM_API_KEYS`` as a bearer token to the gateway, ``ssl_context`` for https."""

    base_url: str
    api_key: str | None = None
    ssl_context: ssl.SSLContext | None = None
    timeout_s: float = 2.0

    def read(self, url: str, *, send_key: bool = True) -> bytes:
        """The body of a GET of ``url`` (a path is taken under ``base_url``); raises
        FetchError on anything but a 2xx answer."""
        if url.startswith("/"):
            url = self.base_url + url
        request = urllib.request.Request(url)
        if send_key and self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self.ssl_context
            ) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url} answered {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise FetchError(f"{url}: {exc.reason}") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # a timeout or reset mid-body, a malformed answer, a target that is no URL
            raise FetchError(f"{url}: {exc!r}") from exc


class Reader(Protocol):
    """What a frame's reads need of a client (``GatewayClient``; a test's fake)."""

    def read(self, url: str, *, send_key: bool = True) -> bytes: ...


def read_sidecars(client: Reader, pool: Executor) -> tuple[dict[SeriesKey, float], list[str]]:
    """Every sidecar's samples, merged, and a line per read that failed. The targets need
    the admin scope when keys are on; the sidecars get no key (they are not the gateway)."""
    try:
        targets = sidecar_targets(json.loads(client.read(TARGETS_PATH)))
    except FetchError as exc:
        return {}, [f"no sidecars: {exc}"]
    except ValueError as exc:
        return {}, [f"no sidecars: {TARGETS_PATH} answered no target list ({exc})"]
    reads = [(target, pool.submit(client.read, target.url, send_key=False)) for target in targets]
    merged: dict[SeriesKey, float] = {}
    problems = []
    for target, future in reads:
        name = f"sidecar {target.node or '?'}"
        try:
            merged.update(parse_metrics(future.result().decode()))
        except FetchError as exc:
            problems.append(f"{name}: {exc}")
        except ValueError as exc:
            problems.append(f"{name}: {target.url} is not Prometheus text ({exc})")
    return merged, problems


def read_frame(client: Reader, pool: Executor) -> Frame:
    """One round of reads: status, the gateway's metrics, then the sidecars'."""
    problems: list[str] = []
    models: list[ServedModel] | None = None
    try:
        models = served_models(json.loads(client.read("/v1/status")))
    except FetchError as exc:
        problems.append(str(exc))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.append(f"/v1/status answered an unexpected shape ({exc!r})")
    scrape: Scrape | None = None
    try:
        gateway = parse_metrics(client.read("/metrics").decode())
        taken_s = time.monotonic()  # when the counters were read: the rates' clock
        sidecars, sidecar_problems = read_sidecars(client, pool)
        problems += sidecar_problems
        scrape = Scrape(taken_s=taken_s, gateway=gateway, sidecars=sidecars)
    except FetchError as exc:
        problems.append(str(exc))
    except ValueError as exc:
        problems.append(f"/metrics is not Prometheus text ({exc})")
    return Frame(models, scrape, tuple(problems))


def render(rows: Sequence[ModelRow], footer: Sequence[str], url: str) -> Group:
    """The table and its footer. Cells are Text, never markup: a ``[`` in a model name is
    a ``[``."""
    table = Table(title=Text(f"loom top  {url}"), title_justify="left", box=box.SIMPLE_HEAD)
    for column in COLUMNS:
        justify: JustifyMethod = "left" if column in ("MODEL", "VERSIONS") else "right"
        table.add_column(Text(column), justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row_cells(row)))
    return Group(table, Text("\n".join(footer), style="dim"))


def footer_lines(problems: Sequence[str], interval_s: float, stale: bool) -> list[str]:
    """``updated 12:00:01 · every 1 s · q quits``, then each failed read."""
    first = f"updated {time.strftime('%H:%M:%S')} · every {interval_s:g} s · q quits"
    if stale:
        first += " · showing the last values read"
    return [first, *problems]


class QuitKeys:
    """The terminal's keys, read as they are pressed (cbreak: no Enter, no echo; Ctrl-C
    still sends SIGINT). The terminal's settings come back on exit, however it is left.
    Without a terminal on stdin there are no keys: only Ctrl-C quits."""

    def __init__(self, stream: TextIO) -> None:
        try:
            self._fd: int | None = stream.fileno() if stream.isatty() else None
        except (OSError, ValueError):  # a replaced stdin (pytest's) has no descriptor
            self._fd = None
        self._saved: list[Any] | None = None

    def __enter__(self) -> QuitKeys:
        if self._fd is not None:
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None and self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def quit_pressed(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s``; True as soon as ``q`` is pressed (or the terminal
        hangs up), False when the time passed without it."""
        if self._fd is None:
            time.sleep(timeout_s)
            return False
        deadline_s = time.monotonic() + timeout_s
        while (left_s := deadline_s - time.monotonic()) > 0:
            readable, _, _ = select.select([self._fd], [], [], left_s)
            if not readable:
                continue
            pressed = os.read(self._fd, 64)
            if not pressed or b"q" in pressed.lower():
                return True
        return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the terminal is restored on a ``kill`` too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_top(client: GatewayClient, *, interval_s: float, console: Console | None = None) -> int:
    """Redraw every ``interval_s`` until ``q``, Ctrl-C or SIGTERM; returns 0."""
    console = console or Console()
    pool = ThreadPoolExecutor(max_workers=SIDECAR_READERS, thread_name_prefix="loom-top")
    state = TopState()
    try:
        with (
            _sigterm_as_interrupt(),
            QuitKeys(sys.stdin) as keys,
            Live(console=console, screen=True, auto_refresh=False) as live,
        ):
            while True:
                started_s = time.monotonic()
                frame = read_frame(client, pool)
                state = advance(state, frame)
                footer = footer_lines(frame.problems, interval_s, state.stale)
                live.update(render(state.rows, footer, client.base_url), refresh=True)
                if keys.quit_pressed(max(0.0, interval_s - (time.monotonic() - started_s))):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
