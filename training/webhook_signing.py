"""Signed webhook deliveries: a receiver checks that a POST came from Loom, unchanged, lately.

Each job with a webhook gets its own secret at submit (``new_webhook_secret``), shown once in
the submit's answer (``webhook_secret``) and never in later reads. Every delivery carries

    Loom-Signature: t=1764979200,v1=5f2c...e9

``v1`` is the hex HMAC-SHA256, keyed with the secret, of ``"<t>.<body>"`` (the unix time the
delivery was signed, a dot, the raw body bytes), the scheme Stripe uses. Signing the time
with the body lets a receiver refuse a replay of an old delivery (``tolerance_s``).

    header = signature_header(body, secret, timestamp_s=time.time())
    verify_signature(body, header, secret, now_s=time.time())  # or SignatureInvalid
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SIGNATURE_HEADER = "Loom-Signature"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300.0
"""How old a signed time a receiver accepts by default: 5 minutes, as Stripe's libraries do."""


class SignatureInvalid(ValueError):
    """The header is missing parts, signed too long ago, or does not match the body."""


def new_webhook_secret() -> str:
    """A fresh secret: ``whsec_`` and 64 hex digits (256 random bits)."""
    return SECRET_PREFIX + secrets.token_hex(32)


def signature(body: bytes, secret: str, timestamp_s: int) -> str:
    """The hex HMAC-SHA256 of ``b"<timestamp_s>." + body`` keyed with ``secret``."""
    signed = str(timestamp_s).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secret: str, *, timestamp_s: float) -> str:
    """The ``Loom-Signature`` value for ``body`` signed at ``timestamp_s`` (whole seconds)."""
    t = int(timestamp_s)
    return f"t={t},v1={signature(body, secret, t)}"


def verify_signature(
    body: bytes,
    header: str,
    secret: str,
    *,
    now_s: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> int:
    """Check a delivery as a receiver does; the signed time, or ``SignatureInvalid``.

    Valid when some ``v1`` in ``header`` equals ``signature(body, secret, t)`` (compared in
    constant time) and ``t`` is within ``tolerance_s`` of ``now_s``."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureInvalid("no t=<unix time> in the signature header") from None
    if abs(now_s - t) > tolerance_s:
        raise SignatureInvalid(f"signed at {t}, over {tolerance_s:g} s from now")
    expected = signature(body, secret, t)
    if not any(hmac.compare_digest(expected, given) for given in parts.get("v1", [])):
        raise SignatureInvalid("no v1 signature matches the body")
    return t
