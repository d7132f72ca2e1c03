"""Fixtures of the server tests: a server app over SQLite and PostgreSQL (``store_url`` from tests/conftest.py),
an in-process ASGI client, and tokens of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from srvkit import AsgiClient, make_token

from metatrail.server.app import create_app
from metatrail.server.config import ServerConfig


@dataclass
class Tokens:
    read: str
    write: str
    admin: str
    other_site: str
    restricted: str


@pytest.fixture
def config(store_url: str) -> ServerConfig:
    return ServerConfig(store=store_url, site="hub", auth_cache_ttl=0)


@pytest.fixture
def tokens(config: ServerConfig) -> Tokens:
    url = config.store
    return Tokens(read=make_token(url, "read"), write=make_token(url, "write"), admin=make_token(url, "admin"),
                  other_site=make_token(url, "read,write", site="site2"),
                  restricted=make_token(url, "read", pipelines=["shared"]))


@pytest.fixture
def client(config: ServerConfig, tokens: Tokens) -> Iterator[AsgiClient]:
    c = AsgiClient(create_app(config))
    try:
        yield c
    finally:
        c.close()
