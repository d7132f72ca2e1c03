"""A pre-imported server launcher for kill -9 tests: reads ``STORE PORT`` lines on stdin, forks a child that serves
that store on that port (a complete metatrail server process), and prints the child's pid. Forking from a process
that already imported FastAPI, uvicorn and SQLAlchemy (and runs no threads) starts a server in milliseconds
instead of seconds, so 20 kill/restart cycles fit in CI time."""

from __future__ import annotations

import os
import sys

import uvicorn

from metatrail.server.app import create_app
from metatrail.server.config import ServerConfig


def main() -> None:
    for line in sys.stdin:
        store, port = line.split()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            app = create_app(ServerConfig(store=store, auth_cache_ttl=0))
            uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="error")
            os._exit(0)
        print(pid, flush=True)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


if __name__ == "__main__":
    main()
