"""Where a webhook may be sent: the address policy, checked at submit and again at delivery.

A webhook URL is chosen by whoever submits a job, and Loom sends to it from inside the
cluster's network. So a URL whose host resolves to a loopback, private (RFC 1918, ULA
``fc00::/7``, shared ``100.64/10``), link-local (``169.254/16`` with the cloud metadata
address ``169.254.169.254``, ``fe80::/10``), multicast, unspecified or reserved address is
refused, including those addresses written as IPv6 (IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-compatible, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``), unless the operator lists its
network in ``training.webhook_allowed_networks``.

    policy = WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"]))
    addresses = vetted_addresses("hooks.example.com", 443, policy)  # or WebhookRefused

The check runs on the addresses the resolver returns, and the deliverer connects to exactly
those (``training.webhooks.post_json``): a name that answers public at submit and private at
delivery (DNS rebinding) is refused at delivery, because the connection never goes through
a second lookup.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
GetAddrInfo = Callable[..., list[tuple[Any, ...]]]
"""``socket.getaddrinfo``'s shape; tests pass a fake resolver."""

RESOLVE_TIMEOUT_S = 2.0
"""The longest a submit waits for the webhook host's name to resolve."""

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


class WebhookRefused(ValueError):
    """The webhook's host resolves to an address the policy refuses (or to none)."""


@dataclass(frozen=True, kw_only=True)
class WebhookAddressPolicy:
    """What a webhook may reach: global unicast addresses, plus ``allowed_networks``."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    """Networks the operator allows although they are not public (e.g. ``127.0.0.1/32``)."""
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S
    """The longest one lookup of the host may take at submit."""
    getaddrinfo: GetAddrInfo = field(default=socket.getaddrinfo, compare=False)
    """The resolver (``socket.getaddrinfo``; a test's fake)."""


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["127.0.0.1/32", "10.1.0.0/16"]`` as networks; ``ValueError`` for a malformed one."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def address_refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why ``address`` may not receive a webhook (``"loopback"``, ``"private"``, ...), or None.

    An address inside one of ``allowed`` is allowed whatever its class. An IPv6 address that
    carries an IPv4 one (mapped, compatible, 6to4, NAT64) is judged as that IPv4 address:
    ``::ffff:127.0.0.1`` is loopback, ``::ffff:8.8.8.8`` public."""
    if any(address in network for network in allowed if network.version == address.version):
        return None
    embedded = _embedded_ipv4(address)
    if embedded is not None:  # the IPv6 wrapper's own prefix is reserved: judge what it carries
        if any(embedded in network for network in allowed if network.version == 4):
            return None
        return _class_refusal(embedded)
    return _class_refusal(address)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    # ``::`` and ``::1`` are in ::/96 too, but are themselves (unspecified, loopback)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) >= 1 << 24):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _class_refusal(address: IPAddress) -> str | None:
    """The address's class when it is not a global unicast address; the order names the most
    telling class first (``127.0.0.1`` is "loopback", though it is also not global)."""
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private or (isinstance(address, ipaddress.IPv4Address) and address in _SHARED):
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not public"
    return None


def sockaddr_ip(sockaddr: tuple[Any, ...]) -> IPAddress:
    """The IP of a ``getaddrinfo`` sockaddr; an IPv6 zone (``fe80::1%eth0``) is dropped."""
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


def vet(addresses: list[tuple[Any, ...]], policy: WebhookAddressPolicy) -> list[tuple[Any, ...]]:
    """``addresses`` (``getaddrinfo`` results) when every one is allowed; ``WebhookRefused``
    naming the first that is not. All must pass, not one: a connection may go to any."""
    if not addresses:
        raise WebhookRefused("resolves to no address")
    for *_, sockaddr in addresses:
        ip = sockaddr_ip(sockaddr)
        reason = address_refusal(ip, policy.allowed_networks)
        if reason is not None:
            raise WebhookRefused(f"resolves to {ip}, a {reason} address")
    return addresses


def vetted_addresses(
    host: str, port: int, policy: WebhookAddressPolicy, *, timeout_s: float | None = None
) -> list[tuple[Any, ...]]:
    """Resolve ``host`` (bounded by ``timeout_s``, default the policy's) and ``vet`` the
    answer: the addresses a connection may use. ``WebhookRefused`` when it resolves to a
    refused address or to none; ``TimeoutError`` or ``OSError`` when it does not resolve."""
    limit_s = policy.resolve_timeout_s if timeout_s is None else timeout_s
    return vet(resolve(host, port, timeout_s=limit_s, getaddrinfo=policy.getaddrinfo), policy)


def resolve(
    host: str, port: int, *, timeout_s: float, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> list[tuple[Any, ...]]:
    """``getaddrinfo(host, port)`` for a TCP connection, waited for at most ``timeout_s``.

    The system resolver takes no timeout, so it runs on a daemon thread; one that outlives
    ``timeout_s`` is left to finish on its own, and the caller gets ``TimeoutError``."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal address: nothing to look up
        return getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: dict[str, Any] = {}

    def look_up() -> None:
        try:
            found["addresses"] = getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # handed to the caller's thread
            found["error"] = exc

    thread = threading.Thread(target=look_up, name="loom-webhook-dns", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"resolving {host!r} took over {timeout_s:.1f} s")
    if "error" in found:
        raise found["error"]
    addresses: list[tuple[Any, ...]] = found["addresses"]
    if not addresses:
        raise OSError(f"{host!r} resolved to no address")
    return addresses


def webhook_url_refusal(url: str, policy: WebhookAddressPolicy) -> str | None:
    """Why a job may not name ``url`` as its webhook (for a 422 on ``webhook_url``), or None.

    Only http and https; the host must resolve, within the policy's time, to allowed
    addresses only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "has an invalid port"
    try:
        vetted_addresses(parts.hostname, port, policy)
    except WebhookRefused as exc:
        return (
            f"{parts.hostname} {exc}; webhooks go to public addresses only, unless the "
            "operator allows the network (training.webhook_allowed_networks)"
        )
    except (OSError, TimeoutError, UnicodeError):
        return f"{parts.hostname} does not resolve"
    return None
