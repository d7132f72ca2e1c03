"""Federation: a server keeps a list of peer servers and syncs with them, pulling and/or pushing, on demand
(``POST /api/v1/peers/{name}/sync``, ``metatrail peer sync``) and on a schedule (``interval_s`` per peer).

Sync with a peer is the same missing-events transfer as a client's push/pull (:mod:`metatrail.sync`), with cursors
kept under the peer's name. Selective sharing: a peer reads only the pipelines its token on *our* server allows
(``metatrail token create --pipelines …``), and we push to it only the pipelines in its ``share`` list. Events
pulled from a peer are recorded with their origin site (the site the peer recorded, else the peer's own site).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from metatrail.errors import ConfigError
from metatrail.store import dialect
from metatrail.store.schema import peers
from metatrail.sync import Filter, HttpEndpoint, LocalEndpoint, Shipped, decode_shipped, reader_key, transfer

if TYPE_CHECKING:
    from metatrail.server.services import Services

log = logging.getLogger("metatrail.server")
PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DIRECTIONS = ("pull", "push", "both")


class PeerStore:
    """Peers in the ``peers`` table of the server's database."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        if migrate:  # creates or upgrades the schema, so the peers table exists
            from metatrail.store import open_store

            open_store(url).close()
        self._engine = dialect.make_engine(url)

    def close(self) -> None:
        """Release connections."""
        self._engine.dispose()

    @staticmethod
    def _public(row: Any, *, with_token: bool = False) -> dict[str, Any]:
        d = dict(row._mapping)
        d["pull"], d["push"] = bool(d["pull"]), bool(d["push"])
        d["share"] = json.loads(d["share"]) if d.get("share") else None
        if not with_token:
            d["has_token"] = bool(d.pop("token"))
        return d

    def add(self, name: str, url: str, *, token: str | None, pull: bool = True, push: bool = False,
            share: Sequence[str] | None = None, interval_s: float | None = None) -> dict[str, Any]:
        """Add or replace a peer."""
        if not PEER_NAME.fullmatch(name):
            raise ConfigError(f"peer name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"peer URL {url!r} must start with http:// or https://")
        if interval_s is not None and interval_s < 1:
            raise ConfigError("a sync interval must be at least 1 second")
        row = {"name": name, "url": url.rstrip("/"), "token": token, "pull": int(pull), "push": int(push),
               "share": json.dumps(sorted(set(share))) if share is not None else None, "interval_s": interval_s,
               "created_at": time.time(), "last_sync_at": None, "last_error": None}

        def run() -> None:
            with self._engine.begin() as conn:
                conn.execute(delete(peers).where(peers.c.name == name))
                conn.execute(peers.insert().values(**row))

        dialect.retrying(run)
        found = self.get(name)
        assert found is not None
        return found

    def get(self, name: str, *, with_token: bool = False) -> dict[str, Any] | None:
        """One peer, or None."""
        with dialect.reading(self._engine) as conn:
            row = conn.execute(select(peers).where(peers.c.name == name)).first()
        return self._public(row, with_token=with_token) if row is not None else None

    def list(self, *, with_token: bool = False) -> list[dict[str, Any]]:
        """Every peer, by name."""
        with dialect.reading(self._engine) as conn:
            return [self._public(r, with_token=with_token) for r in conn.execute(select(peers).order_by(peers.c.name))]

    def remove(self, name: str) -> bool:
        """Remove a peer; False when unknown."""

        def run() -> int:
            with self._engine.begin() as conn:
                return int(conn.execute(delete(peers).where(peers.c.name == name)).rowcount or 0)

        return dialect.retrying(run) > 0

    def record(self, name: str, *, error: str | None) -> None:
        """Note the time (and error, if any) of the last sync with ``name``."""

        def run() -> None:
            with self._engine.begin() as conn:
                conn.execute(update(peers).where(peers.c.name == name)
                             .values(last_sync_at=time.time(), last_error=error))

        dialect.retrying(run)


class WriterEndpoint(LocalEndpoint):
    """The server's own store as a sync destination: received events go through the server's writer, so they are
    group-committed with client ingests and forwarded like them."""

    def __init__(self, services: Services, *, site: str | None) -> None:
        super().__init__(services.store, services.log, site=site)
        self._services = services

    def receive(self, shipped: Sequence[Shipped]) -> int:
        events, sites = decode_shipped(shipped, self.site)
        # A peer's word that an event was recorded at this very site is not taken (a push making that claim is
        # refused): this site lacks it, so it came from the peer.
        own = self._services.config.site
        sites = [self.site if s == own else s for s in sites]
        return self._services.writer.submit(events, self.site, sites).result(timeout=300).inserted


def sync_peer(services: Services, name: str, direction: str = "both") -> dict[str, Any]:
    """Sync with peer ``name`` now (``pull``, ``push`` or ``both``, limited to what the peer is configured for);
    return what each direction did. Errors are recorded on the peer and raised."""
    from metatrail.store.remote import ServerClient

    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {', '.join(DIRECTIONS)}")
    peer = services.peers.get(name, with_token=True)
    if peer is None:
        raise KeyError(name)
    client = ServerClient(peer["url"], peer.get("token"), timeout=services.config.peer_timeout,
                          connect_timeout=min(5.0, services.config.peer_timeout),
                          ca_bundle=services.config.extra.get("ca_bundle"))
    remote = HttpEndpoint(client)
    # Cursors belong to the server the name points at now: a name pointed at another server starts afresh.
    key = f"peer:{name}@{remote.key}"
    out: dict[str, Any] = {"peer": name}
    try:
        if direction in ("pull", "both") and peer["pull"]:
            info = client.request("GET", "/api/v1/version")
            peer_site = str(info.get("site") or name)
            if peer_site == services.config.site:
                # Its events would be recorded as this site's own: a misconfigured peer, or one posing as this site.
                raise ConfigError(f"peer {name} reports this server's own site name {peer_site!r}; not pulling from it")
            local = WriterEndpoint(services, site=peer_site)
            pulled = transfer(remote, local, log=services.log, peer=reader_key(key, peer.get("token")),
                              direction="pull")
            out["pull"] = pulled.as_dict()
            if pulled.rewound:
                log.warning("metatrail server: peer %s's log no longer matches the pull cursor (a restore?); "
                            "compared it from the start", name)
        if direction in ("push", "both") and peer["push"]:
            share = frozenset(peer["share"]) if peer["share"] is not None else None
            source = LocalEndpoint(services.store, services.log, site=services.config.site)
            pushed = transfer(source, remote, log=services.log, peer=key, direction="push",
                              filt=Filter(pipelines=share))
            pushed.skipped = len(remote.refused)
            if pushed.rewound:
                log.warning("metatrail server: peer %s lacks events pushed to it before, or this store's log no "
                            "longer matches the push cursor (a restore?); compared from the start", name)
            out["push"] = pushed.as_dict()
            if remote.refused:
                log.warning("metatrail server: peer %s refused %d event(s), e.g. %s: %s", name, len(remote.refused),
                            *remote.refused[0])
    except Exception as exc:
        services.peers.record(name, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        client.close()
    services.peers.record(name, error=None)
    return out


class Scheduler:
    """Syncs each peer that has an ``interval_s`` when it is due; one daemon thread, errors logged, never raised."""

    def __init__(self, services: Services, tick: float = 5.0) -> None:
        self._services = services
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metatrail-federation", daemon=True)
        self.runs = 0

    def start(self) -> None:
        """Start the schedule."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                due = [p for p in self._services.peers.list() if p["interval_s"]
                       and (p["last_sync_at"] is None or time.time() - p["last_sync_at"] >= p["interval_s"])]
            except Exception as exc:
                log.warning("metatrail server: cannot read peers: %s", exc)
                continue
            for peer in due:
                if self._stop.is_set():
                    return
                try:
                    sync_peer(self._services, peer["name"])
                    self.runs += 1
                except Exception as exc:
                    log.warning("metatrail server: scheduled sync with %s failed: %s", peer["name"], exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the sync in progress, if any (waits up to ``timeout``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
