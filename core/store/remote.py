"""A metatrail server as a store (``http(s)://host:port``), and the small HTTP client every client-side part uses.

:class:`ServerClient` speaks JSON to a metatrail server with a bearer token over the standard library's
``http.client`` (so host processes that ship events need no HTTP dependency): one keep-alive connection, separate
connect and read timeouts, TLS verified (``METATRAIL_CA_BUNDLE`` for a private CA), optional gzip request bodies.
Errors, drawn as a tree::

    StoreError
     └── RemoteError               status (None for network errors), retry_after (seconds or None)
          ├── RemoteUnavailable    connection refused/reset, timeout, 5xx, 408, 429: try again later
          └── RemoteRejected       any other 4xx: the request itself is wrong (bad event, bad or missing token)

:class:`RemoteStore` implements :class:`~metatrail.store.base.EventStore` over the server's API, so the CLI's
``runs``/``show``/``lineage`` work with ``--store https://…``. The token comes from ``METATRAIL_TOKEN`` (or the
``token`` key of the config file).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from metatrail.config import client_settings
from metatrail.errors import ConfigError, StoreError
from metatrail.store.base import EventStore, IngestResult, StoredEvent

USER_AGENT = "metatrail-client"
GZIP_MIN_BYTES = 64 * 1024
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RemoteError(StoreError):
    """A request to a metatrail server failed; ``status`` is the HTTP status (None when no response came)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body


class RemoteUnavailable(RemoteError):
    """The server could not be reached or asked us to come back later (network error, timeout, 5xx, 408, 429)."""


class RemoteRejected(RemoteError):
    """The server refused the request itself (4xx other than 408/429); retrying the same request will not help."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where compressing bodies costs more than it saves, and where a
    server may start without an admin token). Only an address that says so: an empty host binds every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as "use your own backoff"


class ServerClient:
    """JSON over HTTP(S) to one metatrail server (see module docstring). Thread-safe; one request at a time."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                 ca_bundle: str | None = None, compress: bool | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"not a server URL: {url!r}; expected http(s)://host[:port]")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._prefix = parsed.path.rstrip("/")
        self._compress = (not is_loopback(self._host)) if compress is None else compress
        self._ca_bundle = ca_bundle
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._clones: list[ServerClient] = []

    def clone(self) -> ServerClient:
        """A client with the same settings and its own connection (for a second request in flight); closing this
        client closes it too."""
        twin = ServerClient(self.url, self.token, timeout=self.timeout, connect_timeout=self.connect_timeout,
                            ca_bundle=self._ca_bundle, compress=self._compress)
        with self._lock:
            self._clones.append(twin)
        return twin

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                                         context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
            self._conn.connect()
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn = None

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json_body: Any = None,
                raw_body: bytes | None = None, timeout: float | None = None,
                headers: Mapping[str, str] | None = None) -> Any:
        """Send one request; return the decoded JSON response (None for an empty body). Raises :class:`RemoteError`.

        ``raw_body`` is already-encoded JSON (sent as is, so large payloads are not encoded twice).
        """
        query = ""
        if params:
            pairs = [(k, str(v)) for k, v in params.items() if v is not None and not isinstance(v, (list, tuple))]
            pairs += [(k, str(x)) for k, v in params.items() if isinstance(v, (list, tuple)) for x in v]
            query = "?" + urllib.parse.urlencode(pairs) if pairs else ""
        body: bytes | None = raw_body
        if body is None and json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        head = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            head["Content-Type"] = "application/json"
            if self._compress and len(body) >= GZIP_MIN_BYTES:
                body = gzip.compress(body, compresslevel=3)
                head["Content-Encoding"] = "gzip"
        target = f"{self._prefix}{path}{query}"
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            # One retry when a kept-alive connection turns out to be closed by the server; every request we send is
            # idempotent (the server stores an event once however often it arrives).
            for attempt in (0, 1):
                try:
                    conn = self._connect(limit)
                    conn.request(method, target, body=body, headers=head)
                    response = conn.getresponse()
                    data = response.read()
                    status = response.status
                    retry_after = _retry_after(response.getheader("Retry-After"))
                    if response.getheader("Connection", "").lower() == "close":
                        self._drop()
                    break
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                    self._drop()
                    if attempt == 1:
                        raise RemoteUnavailable(f"{self.url}: connection lost ({exc})") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    kind = "timed out" if isinstance(exc, (TimeoutError, socket.timeout)) else "unreachable"
                    raise RemoteUnavailable(f"{self.url} {kind}: {exc}") from None
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data[:200].decode("utf-8", "replace")
        if 200 <= status < 300:
            return decoded
        detail = decoded.get("message") if isinstance(decoded, dict) else decoded
        message = f"{method} {self.url}{path} -> {status}: {detail}"
        if status in RETRYABLE_STATUS or status >= 500:
            raise RemoteUnavailable(message, status=status, retry_after=retry_after, body=decoded)
        raise RemoteRejected(message, status=status, retry_after=retry_after, body=decoded)

    def close(self) -> None:
        """Close the connection (and those of its clones); the client reconnects on the next request."""
        with self._lock:
            self._drop()
            clones = list(self._clones)
        for twin in clones:
            twin.close()


class RemoteStore(EventStore):
    """An :class:`EventStore` over a metatrail server's HTTP API (see module docstring)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        _server, resolved_token, ca_bundle = client_settings(self.url, token)
        self._client = ServerClient(self.url, resolved_token, timeout=timeout, ca_bundle=ca_bundle)

    @property
    def client(self) -> ServerClient:
        """The underlying HTTP client (sync and the shipper share its connection handling)."""
        return self._client

    def ingest(self, events: Sequence[Mapping[str, Any]], *, site: str | None = None,
               sites: Sequence[str | None] | None = None,
               allowed_pipelines: frozenset[str] | None = None) -> IngestResult:
        if allowed_pipelines is not None:
            # The server holds the runs: it applies its token's own pipelines, and this side cannot look for it.
            raise ConfigError("a remote store limits writes by its token's pipelines, not by allowed_pipelines")
        if not events:
            return IngestResult(received=0, inserted=0)
        if sites is not None and len(set(sites)) > 1:
            # One request, so one transaction on the server: a push names each event's origin.
            reply = self._client.request("POST", "/api/v1/sync/push",
                                         json_body={"events": list(events), "origins": list(sites)})
            return IngestResult(received=int(reply["received"]), inserted=int(reply["inserted"]))
        if sites:
            site = sites[0]
        headers = {"X-Metatrail-Site": site} if site else None
        reply = self._client.request("POST", "/api/v1/lineage/batch", json_body=list(events), headers=headers)
        return IngestResult(received=int(reply["received"]), inserted=int(reply["inserted"]),
                            inserted_ids=tuple(reply.get("inserted_ids", ())))

    def iter_events(self, *, after_seq: int = 0, pipeline: str | None = None, run_id: str | None = None,
                    since: float | None = None, limit: int | None = None) -> Iterator[StoredEvent]:
        remaining = limit
        after = after_seq
        while remaining is None or remaining > 0:
            page = 1000 if remaining is None else min(remaining, 1000)
            reply = self._client.request("GET", "/api/v1/events", params={
                "after": after, "pipeline": pipeline, "run_id": run_id, "since": since, "limit": page})
            items = reply["events"]
            for item in items:
                yield StoredEvent(seq=int(item["seq"]), id=item["id"], body=item["event"], site=item.get("site"))
            if remaining is not None:
                remaining -= len(items)
            if not reply.get("more") or not items:
                return
            after = int(items[-1]["seq"])

    def list_runs(self, *, pipeline: str | None = None, state: str | None = None, kind: str | None = None,
                  since: float | None = None, until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        reply = self._client.request("GET", "/api/v1/runs", params={
            "pipeline": pipeline, "state": state, "kind": kind, "since": since, "until": until, "limit": limit})
        runs: list[dict[str, Any]] = reply["runs"]
        return runs

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        try:
            run: dict[str, Any] = self._client.request("GET", f"/api/v1/runs/{urllib.parse.quote(run_id, safe='')}")
        except RemoteRejected as exc:
            if exc.status in (404, 422):
                return None
            raise
        return run

    def list_pipelines(self) -> list[dict[str, Any]]:
        pipelines: list[dict[str, Any]] = self._client.request("GET", "/api/v1/pipelines")["pipelines"]
        return pipelines

    def find_artifacts(self, *, key: str | None = None, hash: str | None = None,
                       namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        reply = self._client.request("GET", "/api/v1/artifacts", params={
            "key": key, "hash": hash, "namespace": namespace, "name": name})
        artifacts: list[dict[str, Any]] = reply["artifacts"]
        return artifacts

    def lineage(self, artifact_keys: Sequence[str], *, direction: str = "upstream",
                depth: int = 10) -> dict[str, Any]:
        graph: dict[str, Any] = self._client.request("GET", "/api/v1/lineage", params={
            "key": list(artifact_keys), "direction": direction, "depth": depth})
        return graph

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._client.request("GET", "/api/v1/stats")
        return stats

    def rebuild_projections(self) -> None:
        self._client.request("POST", "/api/v1/admin/rebuild")

    def close(self) -> None:
        self._client.close()


__all__ = ["RemoteError", "RemoteRejected", "RemoteStore", "RemoteUnavailable", "ServerClient", "client_settings"]
