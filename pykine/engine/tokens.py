"""Auth tokens, as etcd's `--auth-token` chooses them: `simple` (the default) or `jwt`.

simple: a random string naming a user, valid while it is used at least once
per TTL (`--auth-token-ttl`, 300 s). As in etcd 3.4 it carries no auth
revision: permission changes apply to it at once. Changing the user's
password or deleting the user ends it, disabling auth ends them all. Tokens
are kept in a shared document, so a token issued by one instance works on
the others; each instance caches the ones it has seen (until the auth store
changes) and extends their TTL on use.

jwt: a JSON Web Token signed with the configured key (PyJWT), carrying the
user name and auth revision, valid until its `exp`. Nothing is stored: every
instance with the public key verifies it. `--auth-token
jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256,ttl=5m` as in etcd; without
a private key, an instance verifies tokens but issues none.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from dataclasses import dataclass
from typing import Protocol

from pykine.backends.base import Backend
from pykine.durations import parse_duration
from pykine.engine.errors import UnavailableError

TOKEN_DOCUMENT = "auth-tokens"
DEFAULT_TTL = 300.0
LETTERS = string.ascii_letters
# etcd's JWT sign methods.
JWT_METHODS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "HS256",
    "HS384",
    "HS512",
)


class TokenConfigError(ValueError):
    """An --auth-token setting that cannot work; the message says why."""


class InvalidToken(Exception):
    """Unknown, expired, forged or unreadable."""


class Tokens(Protocol):
    async def issue(self, user: str, revision: int) -> str: ...

    async def verify(self, token: str) -> tuple[str, int | None]:
        """The token's user and the auth revision it stands for (None: whatever is current)."""
        ...

    async def forget(self, user: str | None) -> None:
        """Invalidate the user's tokens (None: everyone's), where that is possible."""
        ...

    def store_changed(self) -> None:
        """The auth store moved: what this instance remembers may be stale."""
        ...


class SimpleTokens:
    def __init__(self, backend: Backend, ttl: float = DEFAULT_TTL) -> None:
        self.backend = backend
        self.ttl = ttl
        # token -> (user, auth revision, expires at), as far as this instance knows
        self._known: dict[str, tuple[str, int, float]] = {}
        self._index = 0

    async def issue(self, user: str, revision: int) -> str:
        self._index += 1
        token = "".join(secrets.choice(LETTERS) for _ in range(16)) + f".{self._index}"
        record = (user, revision, time.time() + self.ttl)

        def store(data: bytes) -> bytes:
            now = time.time()
            tokens = {key: value for key, value in (json.loads(data) if data else {}).items() if value[2] > now}
            tokens[token] = list(record)
            return json.dumps(tokens).encode()

        try:
            await self.backend.update_document(TOKEN_DOCUMENT, store)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        self._known[token] = record
        return token

    async def verify(self, token: str) -> tuple[str, int | None]:
        now = time.time()
        record = self._known.get(token)
        if record is None:
            try:
                _, data = await self.backend.read_document(TOKEN_DOCUMENT)
            except Exception as exc:
                raise UnavailableError(str(exc)) from exc
            found = (json.loads(data) if data else {}).get(token)
            if found is not None:
                record = (found[0], found[1], found[2])
        if record is None or record[2] <= now:
            self._known.pop(token, None)
            raise InvalidToken()
        self._known[token] = (record[0], record[1], now + self.ttl)  # used: its TTL starts again
        return record[0], None

    async def forget(self, user: str | None) -> None:
        def drop(data: bytes) -> bytes | None:
            tokens = json.loads(data) if data else {}
            kept = {key: value for key, value in tokens.items() if user is not None and value[0] != user}
            return None if kept == tokens else json.dumps(kept).encode()

        try:
            await self.backend.update_document(TOKEN_DOCUMENT, drop)
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        self.store_changed()

    def store_changed(self) -> None:
        self._known.clear()


@dataclass
class JwtTokens:
    method: str
    verify_key: bytes
    sign_key: bytes | None
    ttl: float = DEFAULT_TTL

    async def issue(self, user: str, revision: int) -> str:
        import jwt

        if self.sign_key is None:
            raise InvalidToken()  # verify-only: this instance cannot sign
        claims = {"username": user, "revision": revision, "exp": int(time.time() + self.ttl)}
        return jwt.encode(claims, self.sign_key, algorithm=self.method)

    async def verify(self, token: str) -> tuple[str, int | None]:
        import jwt

        try:
            claims = jwt.decode(token, self.verify_key, algorithms=[self.method])
            return str(claims["username"]), int(claims["revision"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            raise InvalidToken() from None

    async def forget(self, user: str | None) -> None:
        """Nothing to forget: a JWT lives until it expires, as in etcd (its revision goes stale)."""

    def store_changed(self) -> None:
        """Nothing is remembered."""


def parse_token_option(option: str) -> tuple[str, dict[str, str]]:
    """etcd's --auth-token: `simple`, or `jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`."""
    kind, _, rest = option.partition(",")
    settings: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise TokenConfigError(f"--auth-token option {part!r} is not name=value")
        settings[name] = value
    if kind == "simple":
        if settings:
            raise TokenConfigError("--auth-token simple takes no options")
        return kind, settings
    if kind != "jwt":
        raise TokenConfigError(f"--auth-token must be simple or jwt,…, got {kind!r}")
    unknown = set(settings) - {"pub-key", "priv-key", "sign-method", "ttl"}
    if unknown:
        raise TokenConfigError(f"--auth-token jwt: unknown option {sorted(unknown)[0]!r}")
    method = settings.get("sign-method", "")
    if method not in JWT_METHODS:
        raise TokenConfigError(f"--auth-token jwt: sign-method must be one of {', '.join(JWT_METHODS)}")
    if method.startswith("HS"):
        if "priv-key" not in settings:
            raise TokenConfigError("--auth-token jwt with an HS method needs priv-key (the shared secret)")
    elif "pub-key" not in settings:
        raise TokenConfigError("--auth-token jwt needs pub-key")
    return kind, settings


def make_tokens(option: str, backend: Backend, simple_ttl: float) -> Tokens:
    """The token provider for --auth-token (errors: TokenConfigError)."""
    kind, settings = parse_token_option(option)
    if kind == "simple":
        return SimpleTokens(backend, simple_ttl)
    return load_jwt(settings)


def load_jwt(settings: dict[str, str]) -> JwtTokens:
    """JWT tokens with their key files read and tried now, so mistakes show at start-up."""
    method = settings["sign-method"]

    def read(name: str) -> bytes:
        try:
            with open(settings[name], "rb") as file:
                return file.read()
        except OSError as exc:
            raise TokenConfigError(f"--auth-token jwt: cannot read {name} {settings[name]}: {exc.strerror}") from exc

    sign = read("priv-key") if "priv-key" in settings else None
    verify = sign if method.startswith("HS") else read("pub-key")
    assert verify is not None
    ttl = DEFAULT_TTL
    if "ttl" in settings:
        try:
            ttl = parse_duration(settings["ttl"])
        except ValueError as exc:
            raise TokenConfigError(f"--auth-token jwt: ttl: {exc}") from None
    tokens = JwtTokens(method, verify, sign, ttl)
    _check_keys(tokens)
    return tokens


def _check_keys(tokens: JwtTokens) -> None:
    """Sign and verify once, so that a wrong key or method fails at start-up, not at the first login."""
    import jwt

    try:
        if tokens.sign_key is not None:
            token = jwt.encode({"username": "check", "revision": 0}, tokens.sign_key, algorithm=tokens.method)
            jwt.decode(token, tokens.verify_key, algorithms=[tokens.method], options={"verify_exp": False})
        else:
            jwt.get_algorithm_by_name(tokens.method).prepare_key(tokens.verify_key)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TokenConfigError(f"--auth-token jwt: the keys do not work with {tokens.method}: {exc}") from exc
