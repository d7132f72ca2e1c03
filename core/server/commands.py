"""CLI commands of the server side: ``server``, ``push``, ``pull``, ``token create|list|revoke`` and
``peer add|list|sync``.

``register(subparsers)`` adds them to the ``metatrail`` command's argparse subparsers; each sets ``func`` (the
handler, which returns the exit code). Handlers import FastAPI, uvicorn and the HTTP client lazily, so importing
this module stays light. ``python -m metatrail.server …`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from metatrail.errors import ConfigError, MetatrailError

DEFAULT_PORT = 8765


def _store_url(args: argparse.Namespace) -> str:
    if getattr(args, "store", None):
        return str(args.store)
    from metatrail.config import load_settings

    return load_settings().store


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _filter(args: argparse.Namespace) -> Any:
    from metatrail.sync import Filter, parse_since

    return Filter(pipeline=args.pipeline, run_id=args.run, since=parse_since(args.since),
                  since_text=args.since.strip() if args.since else None)


# -- server ------------------------------------------------------------------------------------------------------
def _cmd_server(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MetatrailError("the server needs its extra: pip install 'metatrail[server]'") from None
    from metatrail.config import load_settings
    from metatrail.server.app import create_app
    from metatrail.server.auth import TokenStore
    from metatrail.server.config import MiB, ServerConfig
    from metatrail.store.remote import is_loopback

    store = _store_url(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for path in (args.tls_cert, args.tls_key):
        if path and not os.path.isfile(path):
            raise ConfigError(f"TLS file {path} does not exist")
    tokens = TokenStore(store)  # creates and migrates the store
    try:
        if not is_loopback(args.host) and not tokens.has_admin():
            raise ConfigError(
                f"refusing to listen on {args.host or 'every interface'} (not a loopback address) with no admin "
                "token configured; "
                f"create one first: metatrail token create --scope admin --store {store}")
    finally:
        tokens.close()
    forward: bool | dict[str, Any] | None = None
    if args.forward_config:
        forward = _read_forward_config(args.forward_config)
    elif args.forward:
        forward = True
    if args.forward_concurrency < 1:
        raise ConfigError(f"--forward-concurrency must be at least 1, got {args.forward_concurrency}")
    config = ServerConfig(store=store, site=args.site or load_settings().site, forward=forward,
                          forward_concurrency=args.forward_concurrency,
                          max_event_bytes=int(args.max_event_mb * MiB), max_batch_bytes=int(args.max_batch_mb * MiB),
                          max_fetch_bytes=int(args.max_fetch_mb * MiB))
    if not args.tls_cert and not is_loopback(args.host):
        print("metatrail: warning: serving without TLS on a non-loopback address; tokens travel in clear text",
              file=sys.stderr)
    app = create_app(config)
    tune_gc()
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                log_level=args.log_level, server_header=False, proxy_headers=False, timeout_graceful_shutdown=10)
    return 0


def tune_gc() -> None:
    """Set the garbage collector up for a server process (only there: it is the process's owner).

    A request's parsed body is a burst of short-lived, acyclic containers (a 2,000-event push is some 270,000 dicts
    and lists), freed by reference counting as soon as the request is done. With the default thresholds the collector
    starts a pass every 700 allocations and, every hundred passes, walks the whole heap, the framework's modules
    included: measured, that was a third of the time spent parsing a push. So the objects of the loaded application
    are frozen out of the collector's reach (``gc.freeze``), and passes start every 50,000 allocations; cyclic garbage
    is still collected.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _read_forward_config(path: str) -> dict[str, Any]:
    """An ``openlineage-python`` client config file (YAML or JSON), e.g. ``{transport: {type: http, url: …}}``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read --forward-config {path}: {exc}") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("transport"), dict):
        raise ConfigError(f"{path}: expected an OpenLineage client config with a 'transport' table")
    return data


# -- push / pull -------------------------------------------------------------------------------------------------
def _cmd_push(args: argparse.Namespace) -> int:
    from metatrail.sync import push

    result = push(_store_url(args), args.to, token=args.token, filt=_filter(args),
                  show_progress=not args.no_progress, compare_all=args.compare_all)
    _say_rewound(result, "push")
    print(f"pushed {result.sent - result.skipped} events ({result.inserted} new to the server) of {result.scanned} "
          f"examined; position {result.position}")
    if result.refused:
        # They stay in the local store; the cursor has moved past them (`push --all` offers them again).
        print(f"metatrail: the server refused {len(result.refused)} event(s); they stay in the local store:",
              file=sys.stderr)
        for event_id, reason in result.refused[:20]:
            print(f"  {event_id}: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from metatrail.sync import pull

    result = pull(_store_url(args), getattr(args, "from"), token=args.token, filt=_filter(args),
                  show_progress=not args.no_progress, compare_all=args.compare_all)
    _say_rewound(result, "pull")
    print(f"pulled {result.sent} events ({result.inserted} new here) of {result.scanned} examined; "
          f"position {result.position}")
    return 0


def _say_rewound(result: Any, verb: str) -> None:
    if result.rewound:
        print(f"metatrail: the last {verb}'s position no longer matches the two logs (one side restored from a "
              "backup?): compared them from the start", file=sys.stderr)


# -- tokens ------------------------------------------------------------------------------------------------------
def _tokens(args: argparse.Namespace) -> Any:
    from metatrail.server.auth import TokenStore

    return TokenStore(_store_url(args), ttl=0)


def _cmd_token_create(args: argparse.Namespace) -> int:
    from metatrail.config import load_settings

    with closing(_tokens(args)) as store:
        record, text = store.create(name=args.name or "", scopes=_split(args.scope) or [],
                                    site=args.site or load_settings().site, pipelines=_split(args.pipelines))
    if args.json:
        _print_json({**record, "token": text})
    else:
        print(text)
        print(f"token {record['id']} ({','.join(record['scopes'])}, site {record['site']}) created; "
              "the token is shown only now", file=sys.stderr)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    with closing(_tokens(args)) as store:
        rows = store.list()
    if args.json:
        _print_json(rows)
        return 0
    for t in rows:
        state = "revoked" if t["revoked_at"] else "active"
        pipelines = ",".join(t["pipelines"]) if t["pipelines"] is not None else "*"
        print(f"{t['id']}  {state:7}  {','.join(t['scopes']):16}  site={t['site']}  pipelines={pipelines}  {t['name']}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    with closing(_tokens(args)) as store:
        done = store.revoke(args.id)
    if not done:
        raise ConfigError(f"no active token with id {args.id}")
    from metatrail.server.config import AUTH_CACHE_TTL as ttl

    # A running server remembers a token it checked for a few seconds (its lookup cache); this process cannot clear
    # that cache, the server's own revoke route does.
    print(f"token {args.id} revoked; a running server that checked it in the last {ttl:g} s may accept it for up to "
          f"{ttl:g} s more (revoke it through the server, DELETE /api/v1/admin/tokens/{args.id}, to end it at once)")
    return 0


# -- peers -------------------------------------------------------------------------------------------------------
def _peers(args: argparse.Namespace) -> Any:
    from metatrail.server.federation import PeerStore

    return PeerStore(_store_url(args))


def _cmd_peer_add(args: argparse.Namespace) -> int:
    with closing(_peers(args)) as peers:
        peer = peers.add(args.name, args.url, token=args.token or os.environ.get("METATRAIL_PEER_TOKEN"),
                         pull=not args.no_pull, push=args.push, share=_split(args.share), interval_s=args.interval)
    _print_json(peer) if args.json else print(f"peer {peer['name']} -> {peer['url']} saved")
    return 0


def _cmd_peer_list(args: argparse.Namespace) -> int:
    with closing(_peers(args)) as peers:
        rows = peers.list()
    if args.json:
        _print_json(rows)
        return 0
    for p in rows:
        modes = "+".join(m for m in ("pull", "push") if p[m]) or "none"
        every = f"every {p['interval_s']:g}s" if p["interval_s"] else "on demand"
        print(f"{p['name']:20} {p['url']:40} {modes:9} {every:14} last error: {p['last_error'] or '-'}")
    return 0


def _cmd_peer_sync(args: argparse.Namespace) -> int:
    from metatrail.config import load_settings
    from metatrail.server.config import ServerConfig
    from metatrail.server.federation import sync_peer
    from metatrail.server.services import Services

    services = Services.open(ServerConfig(store=_store_url(args), site=args.site or load_settings().site))
    try:
        try:
            result = sync_peer(services, args.name, args.direction)
        except KeyError:
            raise ConfigError(f"no peer {args.name}; add it with: metatrail peer add {args.name} URL") from None
    finally:
        services.close()
    _print_json(result)
    return 0


# -- wiring ------------------------------------------------------------------------------------------------------
def _store_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--store", help=f"{what} (default: the configured store, METATRAIL_STORE)")


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", help="only this pipeline's events")
    parser.add_argument("--run", help="only this run (and its child runs)")
    parser.add_argument("--since", help="only events from this time on (ISO 8601, Unix seconds, or an age: 2h, 7d)")
    parser.add_argument("--token", help="bearer token (default: METATRAIL_TOKEN)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    """Add ``server``, ``push``, ``pull``, ``token`` and ``peer`` to the ``metatrail`` command."""
    p = subparsers.add_parser("server", help="run a metatrail server (OpenLineage ingest, sync, queries, federation)")
    _store_arg(p, "the server's store: sqlite:///path or postgresql://…")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--site", help="this server's site name (default: METATRAIL_SITE)")
    p.add_argument("--tls-cert", help="TLS certificate (PEM); with --tls-key serves HTTPS")
    p.add_argument("--tls-key", help="TLS private key (PEM)")
    p.add_argument("--forward", action="store_true",
                   help="also forward every ingested event with openlineage-python's configured transport")
    p.add_argument("--forward-config", help="openlineage-python client config file (YAML) for forwarding")
    p.add_argument("--forward-concurrency", type=int, default=8, metavar="N",
                   help="events in flight to an HTTP forward target at once; each run's events still go in order "
                        "(default 8)")
    p.add_argument("--max-event-mb", type=float, default=5.0, help="largest single event body (MiB)")
    p.add_argument("--max-batch-mb", type=float, default=64.0, help="largest batch/push body (MiB)")
    p.add_argument("--max-fetch-mb", type=float, default=32.0,
                   help="event bodies per sync answer (MiB; more come in further pages)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_server)

    p = subparsers.add_parser("push", help="send the local events a server lacks")
    _store_arg(p, "the local store")
    p.add_argument("--to", help="server URL (default: METATRAIL_SERVER)")
    p.add_argument("--all", action="store_true", dest="compare_all",
                   help="compare the whole log, not only what came after the last push (sends what the server lacks "
                        "from before it too: events the shipper skipped past its backlog bound, a server restored "
                        "from an older backup); the cursor is left as it is")
    _selection(p)
    p.set_defaults(func=_cmd_push)

    p = subparsers.add_parser("pull", help="fetch the events the local store lacks from a server")
    _store_arg(p, "the local store")
    p.add_argument("--from", help="server URL (default: METATRAIL_SERVER)")
    p.add_argument("--all", action="store_true", dest="compare_all",
                   help="compare the server's whole log, not only what came after the last pull (fetches what this "
                        "store lacks from before it too: after the server was restored from a backup, or a run's "
                        "pipeline was settled by a later event); the cursor is left as it is")
    _selection(p)
    p.set_defaults(func=_cmd_pull)

    token = subparsers.add_parser("token", help="manage a server's bearer tokens (run where its store is)")
    tsub = token.add_subparsers(dest="token_command", required=True)
    p = tsub.add_parser("create", help="create a token (printed once)")
    _store_arg(p, "the server's store")
    p.add_argument("--scope", required=True, help="read, write and/or admin, comma-separated")
    p.add_argument("--site", help="the site the token writes as (default: METATRAIL_SITE)")
    p.add_argument("--name", help="a label")
    p.add_argument("--pipelines", help="comma-separated pipelines the token may read (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_token_create)
    p = tsub.add_parser("list", help="list tokens (never their secrets)")
    _store_arg(p, "the server's store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by id")
    _store_arg(p, "the server's store")
    p.add_argument("id")
    p.set_defaults(func=_cmd_token_revoke)

    peer = subparsers.add_parser("peer", help="manage a server's federation peers (run where its store is)")
    psub = peer.add_subparsers(dest="peer_command", required=True)
    p = psub.add_parser("add", help="add or replace a peer server")
    _store_arg(p, "the server's store")
    p.add_argument("name")
    p.add_argument("url")
    p.add_argument("--token", help="the token to present to the peer (default: METATRAIL_PEER_TOKEN)")
    p.add_argument("--no-pull", action="store_true", help="do not pull from this peer")
    p.add_argument("--push", action="store_true", help="also push to this peer")
    p.add_argument("--share", help="comma-separated pipelines pushed to the peer (default: all)")
    p.add_argument("--interval", type=float, help="sync every N seconds while the server runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_peer_add)
    p = psub.add_parser("list", help="list peers")
    _store_arg(p, "the server's store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_peer_list)
    p = psub.add_parser("sync", help="sync with a peer now")
    _store_arg(p, "the server's store")
    p.add_argument("name")
    p.add_argument("--direction", default="both", choices=["pull", "push", "both"])
    p.add_argument("--site", help="this server's site name (default: METATRAIL_SITE)")
    p.set_defaults(func=_cmd_peer_sync)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; errors become one line on stderr and exit code 1."""
    try:
        code: int = args.func(args)
        return code
    except MetatrailError as exc:
        print(f"metatrail: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metatrail: interrupted; run the command again to resume", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metatrail.server``: these commands without the rest of the ``metatrail`` CLI."""
    parser = argparse.ArgumentParser(prog="python -m metatrail.server")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
