"""Test kit for the server tests: the server in-process over ASGI and over real loopback HTTP, a server subprocess,
a fault-injecting proxy, tokens, and fast realistic events.

Everything here is real: the FastAPI app with its store, uvicorn on 127.0.0.1, ``python -m metatrail.server`` in a
subprocess. The proxy sits between a client and a real server and misbehaves on command.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import uvicorn

from metatrail.model import uuid7
from metatrail.openlineage.events import event_id, iso_time
from metatrail.server.app import create_app
from metatrail.server.auth import TokenStore
from metatrail.server.config import ServerConfig
from metatrail.store import open_store

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "data" / "openlineage-spec" / "marquez-fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_token(store_url: str, scopes: str = "read,write", site: str = "site1",
               pipelines: list[str] | None = None) -> str:
    """Create a token directly in a server's store (as ``metatrail token create`` does)."""
    open_store(store_url).close()
    tokens = TokenStore(store_url, ttl=0)
    try:
        return tokens.create(name=f"test-{scopes}", scopes=scopes.split(","), site=site, pipelines=pipelines)[1]
    finally:
        tokens.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- events ------------------------------------------------------------------------------------------------------
def _templates() -> tuple[dict[str, Any], dict[str, Any]]:
    from eventgen import artifact, execution_events

    start, end = execution_events("bulk", "step", t0=1.8e9, inputs=[artifact("/data/in.csv", "a" * 32)],
                                  outputs=[artifact("/data/out.csv", "b" * 32)])
    return start, end


_TEMPLATES: tuple[dict[str, Any], dict[str, Any]] | None = None


def bulk_events(runs: int, *, pipeline: str = "bulk", t0: float = 1.8e9, tag: str = "") -> list[dict[str, Any]]:
    """``2 * runs`` realistic events (START + COMPLETE per run, one input, one output), cheap to make."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    start_text, end_text = (json.dumps(t) for t in _TEMPLATES)
    out: list[dict[str, Any]] = []
    for i in range(runs):
        rid = uuid7(t0 + i)
        for text, dt in ((start_text, 0.0), (end_text, 1.5)):
            e = json.loads(text)
            e["run"]["runId"] = rid
            e["eventTime"] = iso_time(t0 + i + dt)
            e["job"]["name"] = f"{pipeline}.step"
            e["run"]["facets"]["metatrail_execution"]["pipeline"] = pipeline
            if tag:
                e["run"]["facets"]["metatrail_execution"]["params"] = {"tag": tag}
            out.append(e)
    return out


def ids_of(events: list[Mapping[str, Any]]) -> set[str]:
    return {event_id(e) for e in events}


# -- in-process over ASGI ----------------------------------------------------------------------------------------
class AsgiClient:
    """A synchronous facade over ``httpx.AsyncClient(transport=httpx.ASGITransport(app))``, with the app's lifespan
    running in a blocking portal (a real event loop in a thread)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._stack = anyio.from_thread.start_blocking_portal()
        self._portal = self._stack.__enter__()
        self._lifespan = self._portal.wrap_async_context_manager(app.router.lifespan_context(app))
        self._lifespan.__enter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            return await self._client.request(method, url, **kwargs)

        return self._portal.call(go)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self._portal.call(self._client.aclose)
        self._lifespan.__exit__(None, None, None)
        self._stack.__exit__(None, None, None)


# -- real loopback HTTP ------------------------------------------------------------------------------------------
class LiveServer:
    """uvicorn serving the app on 127.0.0.1 (a random port) in a thread of this process."""

    def __init__(self, config: ServerConfig, *, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 port: int | None = None) -> None:
        self.config = config
        self.app = create_app(config)
        self.port = port or free_port()
        scheme = "https" if ssl_certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                     ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


class ServerProcess:
    """``python -m metatrail.server server …`` as a subprocess (for kill -9 and the CLI)."""

    def __init__(self, store: str, *, port: int | None = None, extra: list[str] | None = None,
                 env: Mapping[str, str] | None = None, tls: tuple[str, str] | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.tls = tls  # (certificate file, key file): served with --tls-cert/--tls-key
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "metatrail.server", "server", "--store", store, "--port", str(self.port),
                     *(["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []), *(extra or [])]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            return self._wait_until_up(timeout)
        except BaseException:
            self.kill()  # a server that never answered must not outlive the test
            raise

    def _wait_until_up(self, timeout: float) -> ServerProcess:
        assert self.proc is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                if self.tls:
                    trusting = ssl.create_default_context(cafile=self.tls[0])
                    conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=1,
                                                                                   context=trusting)
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not answer /health in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


class Zygote:
    """A running ``zygote.py``: spawns server processes by fork (see its docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def spawn(self, store: str, port: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{store} {port}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


class ForkedServer:
    """A server process forked by a :class:`Zygote`; same interface as :class:`ServerProcess` for kill tests."""

    def __init__(self, zygote: Zygote, store: str, port: int | None = None) -> None:
        self.zygote = zygote
        self.store = store
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid: int | None = None

    def start(self, timeout: float = 60.0) -> ForkedServer:
        self.pid = self.zygote.spawn(self.store, self.port)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("forked server did not answer /health in time")

    def _gone(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return False
        except OSError:
            return True

    def kill(self) -> None:
        if self.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_for(self._gone, 10)
            self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if not wait_for(self._gone, 20):
                self.kill()
            self.pid = None


@contextmanager
def live(config: ServerConfig, **kwargs: Any) -> Iterator[LiveServer]:
    server = LiveServer(config, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- a misbehaving proxy -----------------------------------------------------------------------------------------
class FaultProxy:
    """An HTTP reverse proxy to ``target`` that misbehaves on command.

    ``mode``: ``ok`` (forward), ``down`` (listening socket closed: connection refused), ``hang`` (accept, read, never
    answer), ``slow`` (forward after ``delay`` seconds). ``statuses`` is a queue of statuses to answer instead of
    forwarding (e.g. ``[503, 500, 429]``), one per request, before forwarding again; 429/503 carry ``Retry-After``.
    Counts what it saw, the most requests it held at once, and the bodies it forwarded in the order they arrived.
    """

    def __init__(self, target: str) -> None:
        self.target = target.replace("http://", "")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "ok"
        self.delay = 0.0
        self.statuses: list[int] = []
        self.fail_after: int | None = None  # forward this many requests, then answer 503 to every one
        self.fail_if: Callable[[bytes], bool] | None = None  # answer 503 to every request whose body it picks
        self.requests = 0
        self.forwarded = 0
        self.faults = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrived: list[bytes] = []  # bodies of the requests forwarded, in arrival order
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._release = threading.Event()
        self._sockets: set[socket.socket] = set()
        self.up()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy._sockets.add(self.connection)
                    proxy.requests += 1
                    status = proxy.statuses.pop(0) if proxy.statuses else None
                    if status is None and proxy.fail_after is not None and proxy.forwarded >= proxy.fail_after:
                        status = 503
                    if status is None and proxy.fail_if is not None and proxy.fail_if(body or b""):
                        status = 503
                    mode, delay = proxy.mode, proxy.delay
                if mode == "hang":
                    proxy.faults += 1
                    proxy._release.wait(120)
                    self.close_connection = True
                    return
                if status is not None:
                    proxy.faults += 1
                    payload = json.dumps({"error": "injected", "message": f"injected {status}"}).encode()
                    self.send_response(status)
                    if status in (429, 503):
                        self.send_header("Retry-After", "0.2")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    proxy.arrived.append(body or b"")
                try:
                    self._forward(body, delay if mode == "slow" else 0.0)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _forward(self, body: bytes | None, delay: float) -> None:
                time.sleep(delay)
                conn = http.client.HTTPConnection(proxy.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _safe(self) -> None:
                try:
                    self._serve()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (its timeout): expected under faults

            do_GET = do_POST = do_DELETE = _safe

        return Handler

    def up(self) -> None:
        if self._server is None:
            self._release.clear()
            server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._server = server

    def down(self) -> None:
        """Stop listening and cut every open connection (clients see resets, then refusals)."""
        if self._server is not None:
            self._release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._sockets.clear()

    def close(self) -> None:
        self.down()


def self_signed_certificate(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key, and the key: (certificate file, key file) in ``directory``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def new_run_id() -> str:
    return str(uuid.uuid4())
