"""OpenID Connect sign-in: discovery, authorization code with PKCE (S256), ID token verification.

The portal is a confidential client of the provider. One sign-in is:

1. ``begin``: fetch (and cache) ``<issuer>/.well-known/openid-configuration``; make a PKCE verifier,
   a ``state`` and a ``nonce``; the caller keeps them server-side for this browser and sends the
   browser to the authorization endpoint.
2. ``finish``: on the callback the caller has already compared ``state``; exchange the code at the
   token endpoint (client_secret_basic, with the verifier) and verify the ID token with joserfc:
   signature against the provider's JWKS (fetched again once when the key id is unknown: keys
   rotate), then ``iss``, ``aud`` (and ``azp`` when several audiences), ``exp``/``iat`` and ``nonce``.

Every failure is an :class:`OidcError` whose message is fit to show on the sign-in page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

log = logging.getLogger(__name__)

SCOPE = "openid email profile"
# RFC 7518 §3.1 signature algorithms an ID token may use (never "none", never HMAC with our secret).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
LEEWAY_S = 30
DISCOVERY_TTL_S = 3600.0
# ID tokens come from the provider's own token endpoint, so an unknown key id is rotation, not an
# attacker; the floor only stops a misbehaving provider from making us fetch on every sign-in.
JWKS_MIN_REFRESH_S = 1.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


class OidcError(Exception):
    """A sign-in through the provider failed; ``str()`` is a plain sentence for the page."""


@dataclass(frozen=True)
class ProviderConfig:
    issuer: str
    client_id: str
    client_secret: str

    @classmethod
    def from_row(cls, config: dict[str, Any]) -> ProviderConfig:
        return cls(str(config.get("issuer", "")).rstrip("/"), str(config.get("client_id", "")),
                   str(config.get("client_secret", "")))


@dataclass
class _Issuer:
    metadata: dict[str, Any]
    fetched_at: float
    keys: KeySet | None = None
    keys_fetched_at: float = 0.0


@dataclass(frozen=True)
class Begin:
    url: str
    state: str
    verifier: str
    nonce: str


@dataclass(frozen=True)
class Identity:
    """Who the provider says signed in."""

    subject: str
    email: str | None
    email_verified: bool | None
    name: str | None
    claims: dict[str, Any] = field(default_factory=dict)


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(n)).decode().rstrip("=")


class OidcClient:
    """Discovery and JWKS caches shared by every provider of the portal."""

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._issuers: dict[str, _Issuer] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        return self._session

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._http().get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise OidcError(f"the identity provider answered {resp.status} for its {what}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("identity provider unreachable for its %s: %s", what, type(e).__name__)
            log.debug("identity provider request failed", extra={"url": url, "error": str(e)})
            raise OidcError(f"the identity provider could not be reached for its {what}") from None
        except ValueError:
            raise OidcError(f"the identity provider's {what} is not JSON") from None
        if not isinstance(data, dict):
            raise OidcError(f"the identity provider's {what} is not a JSON object")
        return data

    async def discover(self, issuer: str) -> dict[str, Any]:
        cached = self._issuers.get(issuer)
        if cached and time.monotonic() - cached.fetched_at < DISCOVERY_TTL_S:
            return cached.metadata
        meta = await self._get_json(issuer + "/.well-known/openid-configuration", "discovery document")
        if str(meta.get("issuer", "")).rstrip("/") != issuer:
            raise OidcError("the identity provider's discovery document names another issuer "
                            f"({meta.get('issuer')!r}, expected {issuer!r})")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(meta.get(key), str):
                raise OidcError(f"the identity provider's discovery document lacks {key}")
        self._issuers[issuer] = _Issuer(meta, time.monotonic())
        return meta

    async def _keys(self, issuer: str, *, refresh: bool = False) -> KeySet:
        await self.discover(issuer)
        entry = self._issuers[issuer]
        stale = time.monotonic() - entry.keys_fetched_at >= JWKS_MIN_REFRESH_S
        if entry.keys is None or (refresh and stale):
            data = await self._get_json(entry.metadata["jwks_uri"], "signing keys (JWKS)")
            try:
                entry.keys = KeySet.import_key_set(data)  # type: ignore[arg-type]
            except (jose_errors.JoseError, ValueError, TypeError, KeyError):
                raise OidcError("the identity provider's signing keys (JWKS) cannot be read") from None
            entry.keys_fetched_at = time.monotonic()
        return entry.keys

    async def begin(self, cfg: ProviderConfig, redirect_uri: str) -> Begin:
        meta = await self.discover(cfg.issuer)
        state, verifier = _b64(32), _b64(32)
        # the nonce is bound to the verifier, which never leaves the portal
        nonce = base64.urlsafe_b64encode(hashlib.sha256(b"oidc-nonce:" + verifier.encode()).digest()).decode().rstrip("=")
        q = {"response_type": "code", "client_id": cfg.client_id, "redirect_uri": redirect_uri, "scope": SCOPE,
             "state": state, "nonce": nonce, "code_challenge": pkce_challenge(verifier),
             "code_challenge_method": "S256"}
        sep = "&" if "?" in meta["authorization_endpoint"] else "?"
        return Begin(meta["authorization_endpoint"] + sep + urlencode(q), state, verifier, nonce)

    async def exchange(self, cfg: ProviderConfig, *, code: str, verifier: str, redirect_uri: str) -> str:
        """Trade the authorization code for tokens; returns the raw ID token."""
        meta = await self.discover(cfg.issuer)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}
        auth = aiohttp.BasicAuth(cfg.client_id, cfg.client_secret)
        try:
            async with self._http().post(meta["token_endpoint"], data=form, auth=auth,
                                         headers={"Accept": "application/json"}) as resp:
                body: Any = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            raise OidcError("the identity provider could not be reached to finish the sign-in") from None
        except ValueError:
            raise OidcError("the identity provider's token answer is not JSON") from None
        if status != 200 or not isinstance(body, dict):
            err = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise OidcError("the identity provider refused to finish the sign-in"
                            + (f": {err}" if err else f" (HTTP {status})"))
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the identity provider sent no ID token")
        return id_token

    async def verify(self, cfg: ProviderConfig, id_token: str, *, nonce: str, now: float | None = None) -> Identity:
        """Check the ID token's signature and claims (OpenID Connect Core §3.1.3.7)."""
        keys = await self._keys(cfg.issuer)
        try:
            tok = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        except jose_errors.InvalidKeyIdError:
            keys = await self._keys(cfg.issuer, refresh=True)
            tok = self._decode(id_token, keys)
        except jose_errors.BadSignatureError:
            raise OidcError("the ID token's signature does not verify with the identity provider's keys") from None
        except (jose_errors.JoseError, ValueError):
            tok = self._decode(id_token, keys)
        claims = dict(tok.claims)
        now_i = int(time.time() if now is None else now)
        if str(claims.get("iss", "")).rstrip("/") != cfg.issuer:
            raise OidcError(f"the ID token was issued by {claims.get('iss')!r}, not by this provider's issuer")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if cfg.client_id not in auds:
            raise OidcError("the ID token was issued for another application (audience mismatch)")
        if len(auds) > 1 and claims.get("azp") != cfg.client_id:
            raise OidcError("the ID token names several audiences but not this portal as authorized party")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise OidcError("the ID token has no expiry")
        if exp + LEEWAY_S < now_i:
            raise OidcError("the ID token has expired; sign in again")
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and iat - LEEWAY_S > now_i:
            raise OidcError("the ID token is issued in the future; check the clocks")
        got_nonce = claims.get("nonce")
        if not isinstance(got_nonce, str) or not hmac.compare_digest(got_nonce.encode(), nonce.encode()):
            raise OidcError("the ID token does not belong to this sign-in (nonce mismatch)")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise OidcError("the ID token names no subject")
        email = claims.get("email")
        ev = claims.get("email_verified")
        name = claims.get("name")
        return Identity(sub, email.strip().lower() if isinstance(email, str) else None,
                        ev if isinstance(ev, bool) else None, name if isinstance(name, str) else None, claims)

    @staticmethod
    def _decode(id_token: str, keys: KeySet) -> jwt.Token:
        try:
            return jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        except jose_errors.InvalidKeyIdError:
            raise OidcError("the ID token is signed by a key the identity provider does not publish") from None
        except jose_errors.BadSignatureError:
            raise OidcError("the ID token's signature does not verify with the identity provider's keys") from None
        except (jose_errors.JoseError, ValueError) as e:
            raise OidcError(f"the ID token cannot be read ({type(e).__name__})") from None
