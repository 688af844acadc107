"""Where a webhook may be sent: the address classes, table by table, with a fake resolver.

No network: names resolve through ``FakeResolver``; literal addresses are parsed, not looked up.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from training.webhook_addresses import (
    WebhookAddressPolicy,
    WebhookRefused,
    address_refusal,
    parse_networks,
    vetted_addresses,
    webhook_url_refusal,
)


class FakeResolver:
    """``getaddrinfo`` over a table of names; a literal address resolves to itself."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.asked.append(host)
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            if host not in self.table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
            addresses = self.table[host]
        return [_addrinfo(address, port) for address in addresses]


def _addrinfo(address: str, port: int) -> tuple[Any, ...]:
    if ipaddress.ip_address(address.split("%")[0]).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


REFUSED = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "private"),  # carrier-grade NAT, RFC 6598
    ("169.254.169.254", "link-local"),  # the cloud metadata address
    ("169.254.0.1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("240.0.0.1", "private"),  # reserved 240/4; Python counts it private first
    ("255.255.255.255", "private"),  # broadcast
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),  # ULA fc00::/7
    ("fd12:3456:789a::1", "private"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    # IPv4 inside IPv6
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.1.2.3", "private"),
    ("::10.1.2.3", "private"),  # IPv4-compatible (deprecated)
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
]

ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_a_non_public_address_is_refused_with_its_class(address: str, reason: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ALLOWED)
def test_a_public_address_is_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "allowed", "reason"),
    [
        ("127.0.0.1", ["127.0.0.1/32"], None),
        ("127.0.0.2", ["127.0.0.1/32"], "loopback"),  # only the network listed
        ("::ffff:127.0.0.1", ["127.0.0.1/32"], None),  # its mapped form is the same address
        ("10.20.3.4", ["10.20.0.0/16"], None),
        ("10.21.3.4", ["10.20.0.0/16"], "private"),
        ("fd00::7", ["fd00::/64"], None),
        ("169.254.169.254", ["10.0.0.0/8"], "link-local"),
    ],
)
def test_an_operators_allowed_networks_let_their_addresses_through(
    address: str, allowed: list[str], reason: str | None
) -> None:
    assert address_refusal(ipaddress.ip_address(address), parse_networks(allowed)) == reason


def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    resolver = FakeResolver(
        {
            "hooks.example.com": ["93.184.216.34"],
            "intranet.example.com": ["10.0.0.7"],
            "metadata.example.com": ["169.254.169.254"],
            "v6-loopback.example.com": ["::1"],
            "mixed.example.com": ["93.184.216.34", "192.168.0.10"],  # one bad address is enough
        }
    )
    policy = WebhookAddressPolicy(getaddrinfo=resolver)

    assert [a[4][0] for a in vetted_addresses("hooks.example.com", 443, policy)] == [
        "93.184.216.34"
    ]
    for name, message in [
        ("intranet.example.com", "resolves to 10.0.0.7, a private address"),
        ("metadata.example.com", "resolves to 169.254.169.254, a link-local address"),
        ("v6-loopback.example.com", "resolves to ::1, a loopback address"),
        ("mixed.example.com", "resolves to 192.168.0.10, a private address"),
    ]:
        with pytest.raises(WebhookRefused, match=message):
            vetted_addresses(name, 443, policy)


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("https://hooks.example.com/loom", None),
        ("http://hooks.example.com:8080/loom", None),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("http://[::ffff:a9fe:a9fe]/", "a link-local address"),
        ("http://127.0.0.1:6379/", "a loopback address"),
        ("http://[::1]:8000/", "a loopback address"),
        ("http://intranet.example.com/", "resolves to 10.0.0.7, a private address"),
        ("http://nowhere.example.com/", "does not resolve"),
        ("ftp://hooks.example.com/", "must be an http or https URL"),
        ("file:///etc/passwd", "must be an http or https URL"),
    ],
)
def test_a_webhook_url_is_refused_for_its_scheme_or_its_hosts_addresses(
    url: str, refusal: str | None
) -> None:
    resolver = FakeResolver(
        {"hooks.example.com": ["93.184.216.34"], "intranet.example.com": ["10.0.0.7"]}
    )
    found = webhook_url_refusal(url, WebhookAddressPolicy(getaddrinfo=resolver))
    if refusal is None:
        assert found is None
    else:
        assert found is not None
        assert refusal in found


def test_a_refusal_names_the_config_option_that_would_allow_it() -> None:
    found = webhook_url_refusal("http://127.0.0.1:9/", WebhookAddressPolicy())
    assert found is not None
    assert "training.webhook_allowed_networks" in found
    allowed = WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"]))
    assert webhook_url_refusal("http://127.0.0.1:9/", allowed) is None


def test_a_malformed_allowed_network_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        parse_networks(["localhost"])
