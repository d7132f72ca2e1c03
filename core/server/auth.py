"""Bearer tokens with scopes and a site, and the per-route access policy (deny by default).

* A token reads ``mt_<id>_<secret>``. The server stores the id, a SHA-256 of the secret (a 256-bit random secret
  needs no slow hash) and the token's scopes, site and readable pipelines; the secret itself is shown once, at
  creation. Comparison is constant-time.
* Scopes: ``read`` (queries, pull), ``write`` (ingest, push), ``admin`` (tokens, peers; implies read and write).
  ``pipelines`` restricts what a token may read (selective sharing with a peer); None = every pipeline. Such a
  token also writes only into those pipelines (:func:`refuse_foreign_pipelines`, and the store, inside the write's
  transaction, for the runs already stored: :class:`~metatrail.errors.ForeignRunError`): a run's pipeline follows its
  latest event, so a write elsewhere could relabel a run it may not read into one it may. It reads a run only when
  every event of the run names one of its pipelines (the store's ``readable_run`` rule, applied by the query and sync
  routes): an event of its own planted with a future time in a run id it can predict keeps that run under its
  pipeline, but no longer opens the owner's events of the run to it.
* A token writes as its own site: a request claiming another site (``X-Metatrail-Site``) is refused with 403
  unless the token is an admin token.
* Every route declares its policy with :func:`policy` (``public``, ``read``, ``write``, ``admin``). Routes are built
  by :class:`PolicyRoute`: a route without a declared policy answers 403 to everyone, and a protected route checks
  the token before its handler runs. No token: 401; a token without the scope: 403.
* Verified tokens are cached for ``ttl`` seconds. A revocation through this server's API clears the cache at once;
  one by another process (``metatrail token revoke``) takes effect within ``ttl`` (0 = at once).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from metatrail.errors import ConfigError
from metatrail.server.errors import ApiError, error_response
from metatrail.store import dialect
from metatrail.store.projection import event_pipeline
from metatrail.store.schema import tokens

PUBLIC, READ, WRITE, ADMIN = "public", "read", "write", "admin"
SCOPES = (READ, WRITE, ADMIN)
POLICY_ATTR = "__metatrail_policy__"
TOKEN_RE = re.compile(r"^mt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's id, name, scopes, site and readable pipelines (None = all)."""

    token_id: str
    name: str
    scopes: frozenset[str]
    site: str
    pipelines: frozenset[str] | None = None

    def can(self, scope: str) -> bool:
        """Whether the token holds ``scope`` (admin holds every scope)."""
        return scope == PUBLIC or ADMIN in self.scopes or scope in self.scopes

    def may_read(self, pipeline: str | None) -> bool:
        """Whether this token may read ``pipeline`` (events without a pipeline only for unrestricted tokens)."""
        return self.pipelines is None or (pipeline is not None and pipeline in self.pipelines)


def policy(level: str) -> Callable[[F], F]:
    """Declare the access policy of a route handler (put it under the ``@router.<method>`` decorator)."""
    if level not in (PUBLIC, READ, WRITE, ADMIN):
        raise ValueError(f"unknown policy {level!r}")

    def mark(fn: F) -> F:
        setattr(fn, POLICY_ATTR, level)
        return fn

    return mark


def route_policy(route: Any) -> str | None:
    """The declared policy of a route, None when it has none (then :class:`PolicyRoute` denies it)."""
    endpoint = getattr(route, "endpoint", None)
    return getattr(endpoint, POLICY_ATTR, None)


def parse_scopes(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"read,write"`` → ``("read", "write")``; unknown scopes are a :class:`ConfigError`."""
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in items if s not in SCOPES]
    if unknown or not items:
        raise ConfigError(f"scopes must be some of {', '.join(SCOPES)}; got {text!r}")
    return tuple(sorted(set(items), key=SCOPES.index))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokenStore:
    """Tokens in the ``tokens`` table of a store's database (see module docstring)."""

    def __init__(self, url: str, *, ttl: float = 5.0, migrate: bool = True) -> None:
        if migrate:  # creates or upgrades the schema, so the tokens table exists
            from metatrail.store import open_store

            open_store(url).close()
        self._engine = dialect.make_engine(url)
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        # Bumped by every revoke: a lookup that read a token's row before a revoke must not cache what it read after.
        self._generation = 0

    def close(self) -> None:
        """Release connections."""
        self._engine.dispose()

    def create(self, *, name: str, scopes: Sequence[str], site: str,
               pipelines: Sequence[str] | None = None) -> tuple[dict[str, Any], str]:
        """Create a token; return its record and the token text (shown once, never stored)."""
        if not SITE_RE.fullmatch(site):
            raise ConfigError(f"site {site!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        scope_list = parse_scopes(scopes)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        row = {"id": token_id, "name": name or token_id, "secret_sha256": _digest(secret),
               "scopes": ",".join(scope_list), "site": site,
               "pipelines": json.dumps(sorted(set(pipelines))) if pipelines is not None else None,
               "created_at": time.time(), "revoked_at": None}

        def run() -> None:
            with self._engine.begin() as conn:
                conn.execute(tokens.insert().values(**row))

        dialect.retrying(run)
        return self._public(row), f"mt_{token_id}_{secret}"

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        d = dict(row) if isinstance(row, dict) else dict(row._mapping)
        d.pop("secret_sha256", None)
        d["scopes"] = d["scopes"].split(",")
        d["pipelines"] = json.loads(d["pipelines"]) if d.get("pipelines") else None
        return d

    def list(self, *, include_revoked: bool = True) -> list[dict[str, Any]]:
        """Every token (without secrets), oldest first."""
        stmt = select(tokens).order_by(tokens.c.created_at)
        if not include_revoked:
            stmt = stmt.where(tokens.c.revoked_at.is_(None))
        with dialect.reading(self._engine) as conn:
            return [self._public(r) for r in conn.execute(stmt)]

    def revoke(self, token_id: str) -> bool:
        """Revoke a token by id; False when no active token has that id."""

        def run() -> int:
            with self._engine.begin() as conn:
                result = conn.execute(update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                                      .values(revoked_at=time.time()))
                return int(result.rowcount or 0)

        done = dialect.retrying(run) > 0
        with self._lock:
            self._generation += 1
            self._cache.clear()
        return done

    def has_admin(self) -> bool:
        """Whether an active admin token exists (a server on a public address refuses to start without one)."""
        return any(ADMIN in t["scopes"] for t in self.list(include_revoked=False))

    def cached(self, text: str) -> tuple[bool, Principal | None]:
        """``(hit, principal)`` from the cache alone (no I/O), so the event loop can skip a thread hop."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(_digest(text))
        if hit is not None and hit[0] > now:
            return True, hit[1]
        return False, None

    def verify(self, text: str) -> Principal | None:
        """The principal of a token text, or None when it is malformed, unknown, wrong or revoked."""
        match = TOKEN_RE.fullmatch(text)
        if not match:
            return None
        now = time.monotonic()
        key = _digest(text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        token_id, secret = match.groups()
        with self._lock:
            generation = self._generation
        with dialect.reading(self._engine) as conn:
            row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        principal = None
        if row is not None and row.revoked_at is None and hmac.compare_digest(row.secret_sha256, _digest(secret)):
            pipelines = frozenset(json.loads(row.pipelines)) if row.pipelines else None
            principal = Principal(token_id=row.id, name=row.name, scopes=frozenset(row.scopes.split(",")),
                                  site=row.site, pipelines=pipelines)
        if self.ttl > 0:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                if generation == self._generation:
                    self._cache[key] = (now + self.ttl, principal)
        return principal


def bearer(request: Request) -> str | None:
    """The bearer token of a request (only the ``Authorization`` header counts; never a query parameter)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(request: Request, level: str) -> Principal:
    """Check the request's token against ``level``; raise 401/403 :class:`ApiError` otherwise."""
    text = bearer(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if text is None:
        raise ApiError(401, "unauthenticated", "this route needs a bearer token (Authorization: Bearer mt_…)",
                       headers=challenge)
    store: TokenStore = request.app.state.services.tokens
    hit, principal = store.cached(text)
    if not hit:
        principal = await run_in_threadpool(store.verify, text)
    if principal is None:
        raise ApiError(401, "invalid_token", "the token is unknown, malformed or revoked", headers=challenge)
    if not principal.can(level):
        raise ApiError(403, "forbidden", f"this route needs a token with the '{level}' scope")
    claimed = request.headers.get("x-metatrail-site")
    if claimed is not None and not SITE_RE.fullmatch(claimed):
        raise ApiError(400, "bad_site", "X-Metatrail-Site: letters, digits, '.', '_' or '-' (at most 64)")
    if claimed is not None and claimed != principal.site and ADMIN not in principal.scopes:
        raise ApiError(403, "wrong_site", f"a token of site '{principal.site}' cannot write as site '{claimed}'")
    return principal


def current(request: Request) -> Principal:
    """The principal the policy check stored on the request (routes with a non-public policy only)."""
    principal: Principal = request.state.principal
    return principal


def refuse_foreign_pipelines(request: Request, events: Sequence[Mapping[str, Any]]) -> frozenset[str] | None:
    """403 (nothing stored) when a token that may read only some pipelines writes an event into another pipeline;
    return those pipelines (None for an unrestricted token), which the writer then holds the events' stored runs to
    (:class:`~metatrail.errors.ForeignRunError`). A run's pipeline follows its latest event, so a write into another
    pipeline's run could otherwise move a run the token cannot read into one it can, and then read it. The runs are
    looked at by the store inside the write's transaction, under its locks: a look here, before the hand-over, could
    be overtaken by another writer's commit. Unrestricted tokens pass at no cost: no lookup, no query (the
    single-event POST is the hot path)."""
    principal = current(request)
    if principal.pipelines is not None:
        _refuse_foreign_events(principal, events)
    return principal.pipelines


def _refuse_foreign_events(principal: Principal, events: Sequence[Mapping[str, Any]]) -> None:
    """403 for the first event whose own pipeline (derived as the projection derives a run's) the token may not
    read; an event without a run belongs to no pipeline, which only unrestricted tokens may read."""
    allowed = ", ".join(sorted(principal.pipelines or ()))
    for event in events:
        pipeline = event_pipeline(event)
        if not principal.may_read(pipeline):
            target = f"pipeline {pipeline!r}" if pipeline is not None else "no pipeline (an event without a run)"
            raise ApiError(403, "pipeline_forbidden",
                           f"this token may write only into the pipelines it may read ({allowed}); "
                           f"this event belongs to {target}")


def writing_site(request: Request) -> str:
    """The site a write is recorded under: the token's own, or for an admin token the site it claims."""
    return request.headers.get("x-metatrail-site") or current(request).site


class PolicyRoute(APIRoute):
    """An APIRoute that enforces its handler's declared policy before the handler runs (deny by default).

    A handler that takes nothing but the request and is declared to return a :class:`Response` is called directly:
    FastAPI's request handler would solve an empty set of dependencies and hand the response back unchanged, which
    cost a single-event POST more than validating the event did."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = self.direct_handler() or super().get_route_handler()
        level = route_policy(self)

        async def guarded(request: Request) -> Response:
            if level is None:
                return error_response(403, "no_policy", "this route has no access policy and is denied")
            query = request.scope.get("query_string") or b""
            if b"\x00" in query or b"%00" in query:
                # No value with a NUL is meaningful here, and PostgreSQL cannot even compare one.
                return error_response(400, "bad_query", "NUL character in the query string")
            if level != PUBLIC:
                request.state.principal = await authenticate(request, level)
            return await handler(request)

        return guarded

    def direct_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]] | None:
        """The endpoint itself, when FastAPI's handler would add nothing: an ``async`` handler whose only parameter
        is the request, without dependencies, body model or response model, declared to return a Response."""
        dep = self.dependant
        try:
            name = dep.request_param_name
            extra = (dep.path_params, dep.query_params, dep.header_params, dep.cookie_params, dep.body_params,
                     dep.dependencies, dep.websocket_param_name, dep.http_connection_param_name,
                     dep.response_param_name, dep.background_tasks_param_name, dep.security_scopes_param_name)
        except AttributeError:  # a FastAPI whose Dependant differs: keep its own handler
            return None
        if (name is None or self.body_field is not None or self.response_field is not None
                or not inspect.iscoroutinefunction(self.endpoint) or any(extra)):
            return None
        try:
            returns = inspect.signature(self.endpoint, eval_str=True).return_annotation
        except (NameError, TypeError, ValueError):
            return None
        if not (isinstance(returns, type) and issubclass(returns, Response)):
            return None
        endpoint = self.endpoint

        async def direct(request: Request) -> Response:
            response: Response = await endpoint(**{name: request})
            return response

        return direct
