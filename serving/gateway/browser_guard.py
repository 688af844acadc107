"""The local default and browsers: the rules that keep a web page from driving Loom.

A page the user visits can make the browser send requests to ``127.0.0.1``: a form or a
``fetch(..., {mode: "no-cors"})`` is a CORS "simple request" (``Content-Type: text/plain``, no
preflight), and DNS rebinding points the page's own name at ``127.0.0.1`` so that even its
reads are same-origin. Three rules, checked before a route's handler (and before its key):

- **Host** (keys off only): the ``Host`` header must name a loopback host (``localhost``,
  ``127.0.0.0/8``, ``[::1]``, any port; also the configured bind host when it is loopback),
  else 421 ``misdirected_request``. A rebound page's requests carry its own name. With keys on
  a public bind is the operator's choice, and the browser has no key to send.
- **Origin** (state-changing methods, keys on or off): an ``Origin`` header that is not the
  server's own origin (``http(s)://`` + a loopback host + the port the request was sent to)
  nor one of ``server.cors_allow_origins`` is refused with 403 ``origin_refused``. Browsers
  send ``Origin`` on every POST, so a page cannot submit, cancel, promote or reshard; clients
  that are not browsers send none.
- **Content-Type** (routes that read a JSON body): ``application/json``, parameters allowed
  (``; charset=utf-8``), else 415 ``unsupported_media_type``. ``application/*+json`` is refused
  too: one media type, and no simple request can carry it. The v2 infer routes
  (``tensor_body``) also take what ``tritonclient.http`` sends: no Content-Type at all, and
  ``application/octet-stream`` with ``Inference-Header-Content-Length`` (the binary tensor
  extension; no browser sends that header without a CORS preflight, which Loom refuses). A
  page's untyped POST still carries its ``Origin``, refused by the rule above.

CORS is off unless ``server.cors_allow_origins`` lists origins (``app.build_http_app`` then
adds Starlette's ``CORSMiddleware`` for exactly those).

    guard = BrowserGuard.of(config.server)
    guard.check(request, json_body=True)     # raises ApiError 421, 403 or 415
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from serving.config.server import ServerConfig
from serving.gateway.errors import ApiError
from serving.gateway.protocols.v2_binary import HEADER_LENGTH

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(authority: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (IPv6 in brackets) -> (host lower-cased, without brackets or one trailing
    dot; port or None); None when it is not that shape."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_or_empty = authority.partition(":")
        if ":" in port_text_or_empty:  # a bare IPv6 address is not a Host
            return None
        port_text = port_text_or_empty if sep else None
    if port_text is not None and not (port_text.isascii() and port_text.isdigit()):
        return None
    port = int(port_text) if port_text else None
    host = host.removesuffix(".")
    return (host, port) if host else None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1), as ``split_host`` gives it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json``, any case, parameters allowed (``; charset=utf-8``)."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == JSON_MEDIA_TYPE


def body_type_allowed(headers: Mapping[str, str], *, tensor_body: bool) -> bool:
    """JSON always; for a v2 infer body also no Content-Type, or octet-stream with the binary
    extension's ``Inference-Header-Content-Length``."""
    content_type = headers.get("content-type")
    if is_json_content_type(content_type):
        return True
    if not tensor_body:
        return False
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == BINARY_MEDIA_TYPE and HEADER_LENGTH in headers


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased with the scheme's default port left out, or None when
    ``origin`` is not an http(s) origin (``null``, a path, a user part)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment:
        return None
    if "@" in parts.netloc:
        return None
    split = split_host(parts.netloc)
    if split is None:
        return None
    host, port = split
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{shown}"
    return f"{parts.scheme}://{shown}:{port}"


@dataclass(frozen=True, kw_only=True)
class BrowserGuard:
    """The three rules (module docstring) for one server's config."""

    keys_on: bool
    cors_allow_origins: frozenset[str] = frozenset()
    """Normalised origins (``normalise_origin``) that may call state-changing routes."""

    @classmethod
    def of(cls, server: ServerConfig) -> BrowserGuard:
        origins = (normalise_origin(origin) for origin in server.cors_allow_origins)
        return cls(
            keys_on=server.keys_on,
            cors_allow_origins=frozenset(o for o in origins if o is not None),
        )

    def host_allowed(self, host_header: str | None) -> bool:
        """Keys on: any Host. Keys off: a loopback name or address, any port."""
        if self.keys_on:
            return True
        split = split_host(host_header) if host_header is not None else None
        if split is None:
            return False
        # the configured bind host, when loopback (keys off requires it), is among these
        return is_loopback_host(split[0])

    def origin_allowed(self, origin: str, host_header: str | None, *, scheme: str) -> bool:
        """The server's own origin (a loopback host on the port the request was sent to), or
        one of ``cors_allow_origins``."""
        normalised = normalise_origin(origin)
        if normalised is None:
            return False
        if normalised in self.cors_allow_origins:
            return True
        origin_host, origin_port = split_host(urlsplit(normalised).netloc) or ("", None)
        origin_scheme = urlsplit(normalised).scheme
        target = split_host(host_header) if host_header is not None else None
        if target is None or not is_loopback_host(origin_host):
            return False
        target_port = target[1] if target[1] is not None else _DEFAULT_PORTS.get(scheme)
        origin_port = origin_port if origin_port is not None else _DEFAULT_PORTS[origin_scheme]
        return origin_port == target_port

    def check(self, request: Request, *, json_body: bool, tensor_body: bool = False) -> None:
        """Raise the ``ApiError`` of the first rule ``request`` breaks (421, 403, 415)."""
        host = request.headers.get("host")
        if not self.host_allowed(host):
            raise ApiError(
                421,
                f"Host {host!r} is not a loopback name: without API keys Loom answers only "
                "requests addressed to localhost, 127.0.0.1 or [::1]",
                code="misdirected_request",
            )
        origin = request.headers.get("origin")
        if (
            origin is not None
            and request.method in STATE_CHANGING_METHODS
            and not self.origin_allowed(origin, host, scheme=request.url.scheme)
        ):
            raise ApiError(
                403,
                f"Origin {origin!r} may not call {request.method} routes: a web page of another "
                "site cannot change Loom's state (server.cors_allow_origins lists the exceptions)",
                code="origin_refused",
            )
        if json_body and not body_type_allowed(request.headers, tensor_body=tensor_body):
            raise ApiError(
                415,
                "Content-Type must be application/json, got "
                f"{request.headers.get('content-type', 'none')!r}",
                code="unsupported_media_type",
                param="Content-Type",
            )
