"""etcd's auth store: users, roles, key permissions, tokens, and the checks every call passes.

The store is one JSON document in the datastore (`Backend.update_document`),
changed under the document's row lock, so every instance of a datastore sees
one store; each instance rereads it when its revision moves (checked every
AUTH_POLL seconds, the watch feed's pace on MySQL, and at once after its own
changes). The document's
revision is etcd's auth revision: a token remembers the revision it was
issued at, and a request whose token is older than the store answers
`revision of auth store is old`, as in etcd, so clients authenticate again.

Tokens are engine/tokens.py's. Passwords are bcrypt hashes at etcd's cost (10), computed off the event loop.

Permissions are checked as etcd checks them: a request's key range must lie
inside the union of the ranges its user's roles may read (or write); the
root role may do anything. With a verified TLS client certificate and no
token, the certificate's CommonName is the user.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from pykine.backends.base import Backend
from pykine.engine.errors import AuthError, UnavailableError
from pykine.engine.polling import poll_forever
from pykine.engine.tokens import InvalidToken, SimpleTokens, Tokens

ROOT = "root"
READ, WRITE, READWRITE = 0, 1, 2
BCRYPT_COST = 10
AUTH_DOCUMENT = "auth"
AUTH_POLL = 0.05

# etcd's auth errors, by name; services/errors.py maps each to its code and message.
NOT_ENABLED = "not enabled"
AUTH_FAILED = "auth failed"
INVALID_TOKEN = "invalid token"
OLD_REVISION = "old revision"
PERMISSION_DENIED = "permission denied"
USER_EMPTY = "user empty"
USER_EXISTS = "user exists"
USER_NOT_FOUND = "user not found"
ROLE_EMPTY = "role empty"
ROLE_EXISTS = "role exists"
ROLE_NOT_FOUND = "role not found"
ROLE_NOT_GRANTED = "role not granted"
PERMISSION_NOT_GRANTED = "permission not granted"
ROOT_USER_MISSING = "root user missing"
ROOT_ROLE_MISSING = "root role missing"
INVALID_MANAGEMENT = "invalid management"
NO_PASSWORD_USER = "no password user"

# Where a key range ends when it has no end: past every key.
INFINITY = None


@dataclass(slots=True)
class User:
    password: bytes  # bcrypt hash; empty with no_password
    roles: list[str] = field(default_factory=list)  # sorted
    no_password: bool = False


@dataclass(frozen=True, slots=True)
class Permission:
    kind: int
    key: bytes
    range_end: bytes


@dataclass(slots=True)
class AuthState:
    enabled: bool = False
    users: dict[str, User] = field(default_factory=dict)
    roles: dict[str, list[Permission]] = field(default_factory=dict)  # perms sorted by key, range_end

    def to_bytes(self) -> bytes:
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        return json.dumps(
            {
                "enabled": self.enabled,
                "users": {
                    name: {"password": b64(user.password), "roles": user.roles, "no_password": user.no_password}
                    for name, user in self.users.items()
                },
                "roles": {
                    name: [[perm.kind, b64(perm.key), b64(perm.range_end)] for perm in perms]
                    for name, perms in self.roles.items()
                },
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AuthState:
        if not data:
            return cls()
        doc = json.loads(data)
        return cls(
            enabled=doc["enabled"],
            users={
                name: User(base64.b64decode(user["password"]), list(user["roles"]), user["no_password"])
                for name, user in doc["users"].items()
            },
            roles={
                name: [Permission(kind, base64.b64decode(key), base64.b64decode(end)) for kind, key, end in perms]
                for name, perms in doc["roles"].items()
            },
        )

    # -- etcd's auth management, applied to the stored state under its lock ----------------

    def add_user(self, name: str, password: bytes, no_password: bool) -> None:
        if not name:
            raise AuthError(USER_EMPTY)
        if name in self.users:
            raise AuthError(USER_EXISTS)
        self.users[name] = User(b"" if no_password else password, [], no_password)

    def user(self, name: str) -> User:
        user = self.users.get(name)
        if user is None:
            raise AuthError(USER_NOT_FOUND)
        return user

    def delete_user(self, name: str) -> None:
        if self.enabled and name == ROOT:
            raise AuthError(INVALID_MANAGEMENT)
        self.user(name)
        del self.users[name]

    def change_password(self, name: str, password: bytes) -> None:
        user = self.user(name)
        user.password = password

    def grant_role(self, name: str, role: str) -> None:
        user = self.user(name)
        if role != ROOT and role not in self.roles:
            raise AuthError(ROLE_NOT_FOUND)
        if role not in user.roles:
            bisect.insort(user.roles, role)

    def revoke_role(self, name: str, role: str) -> None:
        if self.enabled and name == ROOT and role == ROOT:
            raise AuthError(INVALID_MANAGEMENT)
        user = self.user(name)
        if role not in user.roles:
            raise AuthError(ROLE_NOT_GRANTED)
        user.roles.remove(role)

    def add_role(self, name: str) -> None:
        if not name:
            raise AuthError(ROLE_EMPTY)
        if name in self.roles:
            raise AuthError(ROLE_EXISTS)
        self.roles[name] = []

    def role(self, name: str) -> list[Permission]:
        perms = self.roles.get(name)
        if perms is None:
            raise AuthError(ROLE_NOT_FOUND)
        return perms

    def delete_role(self, name: str) -> None:
        if self.enabled and name == ROOT:
            raise AuthError(INVALID_MANAGEMENT)
        self.role(name)
        del self.roles[name]
        for user in self.users.values():
            if name in user.roles:
                user.roles.remove(name)

    def grant_permission(self, name: str, perm: Permission) -> None:
        """etcd 3.4's rule, copies included: only the first permission on the same key is
        updated (if its range_end matches too); otherwise the new one joins the list, which
        stays ordered by key, equal keys in the order granted."""
        perms = self.role(name)
        first = bisect.bisect_left([held.key for held in perms], perm.key)
        if first < len(perms) and perms[first].key == perm.key and perms[first].range_end == perm.range_end:
            perms[first] = perm
            return
        perms.append(perm)
        perms.sort(key=lambda held: held.key)  # stable

    def revoke_permission(self, name: str, key: bytes, range_end: bytes) -> None:
        """Takes every copy of (key, range_end)."""
        perms = self.role(name)
        kept = [held for held in perms if not (held.key == key and held.range_end == range_end)]
        if len(kept) == len(perms):
            raise AuthError(PERMISSION_NOT_GRANTED)
        perms[:] = kept

    def enable(self) -> None:
        root = self.users.get(ROOT)
        if root is None:
            raise AuthError(ROOT_USER_MISSING)
        if ROOT not in root.roles:
            raise AuthError(ROOT_ROLE_MISSING)
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """Who makes a request, and the auth revision their credentials are from."""

    user: str
    revision: int


def _interval(key: bytes, range_end: bytes) -> tuple[bytes, bytes | None]:
    """etcd's key range forms: one key, [key, range_end), or from key on ("\\0")."""
    if not range_end:
        return key, key + b"\x00"
    if range_end == b"\x00":
        return key, INFINITY
    return key, range_end


def _covers(merged: list[tuple[bytes, bytes | None]], start: bytes, end: bytes | None) -> bool:
    """Whether one merged interval holds [start, end)."""
    index = bisect.bisect_right([begin for begin, _ in merged], start) - 1
    if index < 0:
        return False
    _, upto = merged[index]
    if upto is INFINITY:
        return True
    return end is not INFINITY and end <= upto


def _merge(intervals: list[tuple[bytes, bytes | None]]) -> list[tuple[bytes, bytes | None]]:
    merged: list[tuple[bytes, bytes | None]] = []
    for begin, end in sorted(intervals, key=lambda ivl: ivl[0]):
        if merged and (merged[-1][1] is INFINITY or begin <= merged[-1][1]):  # type: ignore[operator]
            last_begin, last_end = merged[-1]
            if last_end is not INFINITY and (end is INFINITY or end > last_end):  # type: ignore[operator]
                merged[-1] = (last_begin, end)
            continue
        merged.append((begin, end))
    return merged


class AuthStore:
    """This instance's view of the shared auth store, and the operations on it."""

    def __init__(self, backend: Backend, tokens: Tokens | None = None) -> None:
        self.backend = backend
        self.tokens: Tokens = tokens or SimpleTokens(backend)
        self.state = AuthState()
        self.revision = 0
        self._merged: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    async def load(self) -> None:
        revision, data = await self.backend.read_document(AUTH_DOCUMENT)
        if revision != self.revision:
            self._adopt(revision, data)

    def _adopt(self, revision: int, data: bytes) -> None:
        self.state = AuthState.from_bytes(data)
        self.revision = revision
        self._merged.clear()
        self.tokens.store_changed()

    async def follow(self) -> None:
        """Hear of changes other instances make, within AUTH_POLL."""
        await poll_forever(self.load, AUTH_POLL, "reading the auth store")

    # -- changes ---------------------------------------------------------------------

    async def change(self, apply: Callable[[AuthState], Any]) -> Any:
        """Apply `apply` to the stored state under its lock; what it returns is returned."""
        outcome: list[Any] = []

        def update(data: bytes) -> bytes | None:
            state = AuthState.from_bytes(data)
            before = state.to_bytes()
            outcome.append(apply(state))
            after = state.to_bytes()
            return None if after == before else after  # no change, no new auth revision

        try:
            revision, data = await self.backend.update_document(AUTH_DOCUMENT, update)
        except AuthError:
            raise
        except Exception as exc:
            raise UnavailableError(str(exc)) from exc
        self._adopt(revision, data)
        return outcome[0]

    # -- identities -------------------------------------------------------------------

    async def authenticate(self, name: str, password: str) -> str:
        if not self.enabled:
            raise AuthError(NOT_ENABLED)
        user = self.state.users.get(name)
        if user is None:
            raise AuthError(AUTH_FAILED)
        if user.no_password:
            raise AuthError(NO_PASSWORD_USER)
        matches = await asyncio.to_thread(bcrypt.checkpw, password.encode(), user.password)
        if not matches:
            raise AuthError(AUTH_FAILED)
        try:
            return await self.tokens.issue(name, self.revision)
        except InvalidToken:
            raise AuthError(AUTH_FAILED) from None

    async def identify(self, token: str | None, common_name: str | None) -> AuthInfo | None:
        """The caller, from a token or a TLS client certificate (None: no identity given).

        A token is checked whenever one is sent, auth enabled or not, as etcd does.
        """
        if token is not None:  # an empty one too
            try:
                user, revision = await self.tokens.verify(token)
            except InvalidToken:
                raise AuthError(INVALID_TOKEN) from None
            return AuthInfo(user, self.revision if revision is None else revision)
        if common_name and self.enabled:
            return AuthInfo(common_name, self.revision)
        return None

    # -- checks ---------------------------------------------------------------------------

    def checked_user(self, info: AuthInfo | None) -> User:
        if info is None or not info.user:
            raise AuthError(USER_EMPTY)
        if info.revision < self.revision:
            raise AuthError(OLD_REVISION)
        user = self.state.users.get(info.user)
        if user is None:
            raise AuthError(PERMISSION_DENIED)
        return user

    def check_admin(self, info: AuthInfo | None) -> None:
        """Only the root role may manage auth and run admin calls (when auth is on)."""
        if not self.enabled:
            return
        if ROOT not in self.checked_user(info).roles:
            raise AuthError(PERMISSION_DENIED)

    def check_range(self, info: AuthInfo | None, key: bytes, range_end: bytes, write: bool) -> None:
        if not self.enabled:
            return
        user = self.checked_user(info)
        if ROOT in user.roles:
            return
        assert info is not None
        merged = self._merged.get((info.user, WRITE if write else READ))
        if merged is None:
            wanted = (WRITE, READWRITE) if write else (READ, READWRITE)
            merged = _merge(
                [
                    _interval(perm.key, perm.range_end)
                    for role in user.roles
                    for perm in self.state.roles.get(role, [])
                    if perm.kind in wanted
                ]
            )
            self._merged[(info.user, WRITE if write else READ)] = merged
        if not _covers(merged, *_interval(key, range_end)):
            raise AuthError(PERMISSION_DENIED)

    def is_root(self, info: AuthInfo | None) -> bool:
        return bool(info and info.user in self.state.users and ROOT in self.state.users[info.user].roles)


def hash_password(password: str) -> bytes:
    """Slow on purpose (~60 ms): call off the event loop."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST))
