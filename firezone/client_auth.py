"""Client browser sign-in, the parts both sides agree on: URLs, the callback, the state check.

The client makes a random ``state`` and ``nonce`` and opens ``<portal>/<account>?as=client&state=…
&nonce=…``. After sign-in the portal redirects the browser to the custom scheme
``firezone-fd0020211111://handle_client_sign_in_callback?…`` carrying the token *fragment*
(``.<id>.<secret>``), the actor's name, the account and the ``state``. The client checks ``state``
in constant time and prefixes its ``nonce`` to the fragment to get the whole token: whoever sees
only the callback URL (another app registered for the scheme, a shell history) holds nothing usable.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlencode, urlsplit

SCHEME = "firezone-fd0020211111"
CALLBACK_HOST = "handle_client_sign_in_callback"
CALLBACK_PREFIX = f"{SCHEME}://{CALLBACK_HOST}"
CLIENT_KINDS = ("client", "gui-client", "headless-client")
_MAX_URL = 8192


class CallbackError(ValueError):
    """The text is not a sign-in callback URL this client can use."""


def random_hex(nbytes: int = 32) -> str:
    """A fresh random value for ``state`` or ``nonce`` (32 bytes, hex)."""
    return secrets.token_hex(nbytes)


def sign_in_url(portal: str, account: str, *, state: str, nonce: str, as_: str = "client") -> str:
    """The portal page where the user picks a provider for this client sign-in."""
    if as_ not in CLIENT_KINDS:
        raise ValueError(f"as must be one of {', '.join(CLIENT_KINDS)}")
    q = urlencode({"as": as_, "state": state, "nonce": nonce})
    return f"{portal.rstrip('/')}/{quote(account, safe='')}?{q}"


def callback_url(*, fragment: str, actor_name: str, account_slug: str, account_name: str, state: str,
                 provider_identifier: str = "") -> str:
    """What the portal sends the browser to after a successful client sign-in."""
    q = urlencode({"actor_name": actor_name, "fragment": fragment, "identity_provider_identifier":
                   provider_identifier, "state": state, "account_slug": account_slug,
                   "account_name": account_name})
    return f"{CALLBACK_PREFIX}?{q}"


@dataclass(frozen=True)
class Callback:
    """The fields of a sign-in callback URL."""

    fragment: str
    state: str
    actor_name: str
    account_slug: str
    account_name: str
    provider_identifier: str


def parse_callback(url: str) -> Callback:
    """Parse a pasted or handed-over callback URL; CallbackError says what is wrong with it."""
    url = (url or "").strip()
    if not url:
        raise CallbackError("empty callback URL")
    if len(url) > _MAX_URL:
        raise CallbackError("callback URL too long")
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME or parts.netloc.lower() != CALLBACK_HOST:
        raise CallbackError(f"not a sign-in callback: expected a URL starting with {CALLBACK_PREFIX}")
    q = parse_qs(parts.query, keep_blank_values=True)

    def one(name: str, required: bool = True) -> str:
        vals = q.get(name, [])
        if len(vals) > 1:
            raise CallbackError(f"callback URL has {name!r} more than once")
        if not vals or (required and not vals[0]):
            if required:
                raise CallbackError(f"callback URL lacks {name!r}")
            return ""
        return vals[0]

    fragment = one("fragment")
    if not is_fragment(fragment):
        raise CallbackError("callback URL carries no valid token fragment")
    return Callback(fragment=fragment, state=one("state"), actor_name=one("actor_name", False),
                    account_slug=one("account_slug"), account_name=one("account_name", False),
                    provider_identifier=one("identity_provider_identifier", False))


def is_fragment(text: str) -> bool:
    """``.<uuid>.<alnum secret>``: a token without its nonce."""
    parts = text.split(".")
    return (len(parts) == 3 and parts[0] == "" and len(parts[1]) == 36 and parts[2].isalnum()
            and all(c in "0123456789abcdef-" for c in parts[1].lower()))


def state_matches(expected: str, received: str) -> bool:
    """Constant-time comparison of the state the client made with the one that came back."""
    return hmac.compare_digest(expected.encode(), received.encode())


def assemble_token(nonce: str, fragment: str) -> str:
    """The whole client token: the nonce only this client knows, then the fragment."""
    if not is_fragment(fragment):
        raise CallbackError("not a token fragment")
    return nonce + fragment
