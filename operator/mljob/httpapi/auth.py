"""Who is asking, and may they see it: the caller's Kubernetes token, checked by the apiserver.

Why the apiserver decides: platform teams keep Postgres, Redis and NATS credentials to the
operator's processes, and Kubernetes RBAC already says who may see which MLJob. So a request
carries the caller's own bearer token; a TokenReview asks the apiserver whose it is, and a
SubjectAccessReview whether that user may `get` (or `list`) MLJobs there. The API's own
ServiceAccount needs only `create` on both reviews (and `get`/`list` on MLJobs to read them).

Both answers are kept for `ttl` seconds (`MLJOB_API_REVIEW_CACHE_SECONDS`), keyed by a SHA-256
of the token, never the token: a page that makes ten requests costs the apiserver two reviews,
not twenty, and a revoked token or right is refused again within `ttl`. Refusals are cached
too (a flood of bad tokens costs one review each per `ttl`); an apiserver that cannot be asked
is not (the next request asks again). Tokens are never logged: the TokenReview's reply, which
echoes it, is reduced to its status by the adapter.

A browser cannot add a header by itself: the job pages' login form (`pages`) puts the token in
an HttpOnly, SameSite=Strict cookie, `COOKIE`, read here after the two headers, so the pages'
links (the results export, the throughput the chart reads) are checked by the same two reviews.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mljob.api.models import GROUP, PLURAL

#: The header that carries the token through the apiserver's service proxy: the apiserver
#: authenticates the caller by `Authorization` and removes that header before proxying.
TOKEN_HEADER = "X-MLJob-Token"
#: The cookie the pages' login sets (HttpOnly, SameSite=Strict; Secure over TLS).
COOKIE = "mljob_token"
#: How long one review may take before the request is answered 503.
REVIEW_TIMEOUT_SECONDS = 5.0
#: Answers kept at most (each is a hash and a few strings): a flood of distinct tokens
#: evicts the oldest instead of growing without bound.
MAX_CACHED = 10_000

V = TypeVar("V")


class Unauthenticated(Exception):
    """No token, or one the apiserver does not accept (401); the message says which."""


class Forbidden(Exception):
    """The user may not do this (403); the message names the user, verb and object."""


class ReviewUnavailable(Exception):
    """The apiserver could not be asked (503): not the caller's fault, and not cached."""


class Reviews(Protocol):
    """What the reviews need from Kubernetes (adapters.kube.Kube has both)."""

    async def review_token(self, token: str, timeout: float) -> dict[str, Any]: ...
    async def review_access(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]: ...


@dataclass(frozen=True)
class User:
    """An authenticated caller, as the TokenReview named them."""

    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def bearer_token(headers: Mapping[str, str], cookies: Mapping[str, str] | None = None) -> str | None:
    """The caller's token: `Authorization: Bearer <token>`, else the `X-MLJob-Token` header
    (with or without `Bearer `), else the pages' cookie; None when none carries one."""
    for header in ("Authorization", TOKEN_HEADER):
        value = headers.get(header, "").strip()
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
        if header == TOKEN_HEADER and value and " " not in value:
            return value
    value = (cookies or {}).get(COOKIE, "").strip()
    return value if value and " " not in value else None


def token_key(token: str) -> str:
    """What the caches keep instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TTLCache(Generic[V]):
    """Values kept `ttl` seconds, at most `size` of them (the oldest go first)."""

    ttl: float
    size: int = MAX_CACHED
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[Any, tuple[float, V]] = field(default_factory=OrderedDict)

    def get(self, key: Any) -> tuple[bool, V | None]:
        """(found, value)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= self.clock():
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: Any, value: V) -> None:
        if self.ttl <= 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.size:
            self._entries.popitem(last=False)
        self._entries[key] = (self.clock() + self.ttl, value)

    def __len__(self) -> int:
        return len(self._entries)


def _user_of(status: Mapping[str, Any]) -> User:
    user = status.get("user") or {}
    extra = {str(k): tuple(str(v) for v in values or ()) for k, values in (user.get("extra") or {}).items()}
    return User(
        name=str(user.get("username") or ""),
        uid=str(user.get("uid") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra=extra,
    )


def access_spec(user: User, verb: str, namespace: str, name: str | None) -> dict[str, Any]:
    """The SubjectAccessReview spec: may `user` `verb` MLJobs in `namespace` (named `name`)?"""
    attributes: dict[str, Any] = {"group": GROUP, "resource": PLURAL, "verb": verb, "namespace": namespace}
    if name is not None:
        attributes["name"] = name
    spec: dict[str, Any] = {"user": user.name, "resourceAttributes": attributes}
    if user.uid:
        spec["uid"] = user.uid
    if user.groups:
        spec["groups"] = list(user.groups)
    if user.extra:
        spec["extra"] = {key: list(values) for key, values in user.extra.items()}
    return spec


def _unavailable(what: str, err: Exception) -> ReviewUnavailable:
    """A review that failed: its HTTP status and reason only (an error body may quote input)."""
    status = getattr(err, "status", None)
    if status is not None:
        why = f"{status} {getattr(err, 'reason', '') or ''}".strip()
        if status == 403:
            why += ": the API's ServiceAccount needs create on tokenreviews and subjectaccessreviews"
    else:
        why = type(err).__name__  # a connection error's text names hosts, not the token
    return ReviewUnavailable(f"cannot ask the Kubernetes API {what} ({why}); try again")


class Reviewer:
    """The two reviews, cached; `user` then `require` for each request."""

    def __init__(
        self,
        kube: Reviews,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = REVIEW_TIMEOUT_SECONDS,
        size: int = MAX_CACHED,
    ) -> None:
        self.kube = kube
        self.timeout = timeout
        self.users: TTLCache[User | str] = TTLCache(ttl, size, clock)
        self.rights: TTLCache[tuple[bool, str]] = TTLCache(ttl, size, clock)

    async def user(self, token: str | None) -> User:
        """Who `token` is; Unauthenticated when there is none or the apiserver refuses it."""
        if token is None:
            raise Unauthenticated(
                "no token: send `Authorization: Bearer <token>` (or the X-MLJob-Token header through "
                "the apiserver's service proxy) with a Kubernetes token, e.g. `kubectl create token`; "
                "in a browser, log in at /ui/"
            )
        key = token_key(token)
        found, known = self.users.get(key)
        if not found:
            try:
                status = await self.kube.review_token(token, self.timeout)
            except Exception as err:
                raise _unavailable("who this token is", err) from None
            user = _user_of(status)
            known = user if status.get("authenticated") and user.name else str(status.get("error") or "")
            self.users.put(key, known)
        if isinstance(known, User):
            return known
        raise Unauthenticated(
            "the Kubernetes API does not accept this token"
            + (f" ({known})" if known else "")
            + ": it may have expired; get a new one"
        )

    async def require(self, token: str, user: User, verb: str, namespace: str, name: str | None) -> None:
        """Forbidden unless `user` may `verb` MLJobs in `namespace` (the one named `name`)."""
        key = (token_key(token), verb, namespace, name)
        found, answer = self.rights.get(key)
        if not found or answer is None:
            try:
                status = await self.kube.review_access(access_spec(user, verb, namespace, name), self.timeout)
            except Exception as err:
                raise _unavailable(f"whether {user.name} may {verb} it", err) from None
            answer = (
                bool(status.get("allowed")) and not status.get("denied"),
                str(status.get("reason") or ""),
            )
            self.rights.put(key, answer)
        allowed, reason = answer
        if not allowed:
            what = f"mljobs.{GROUP} {name!r}" if name is not None else f"mljobs.{GROUP}"
            raise Forbidden(
                f"{user.name} may not {verb} {what} in namespace {namespace!r}"
                + (f" ({reason})" if reason else "")
                + ": ask for a Role that grants it"
            )
