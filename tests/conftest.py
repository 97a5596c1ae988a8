"""Fixtures shared by the test modules: a real redis-server per test."""

import pytest

from redis_fixture import FakeRedis, PartitionProxy, RedisServer


@pytest.fixture
def start_redis(tmp_path_factory):
    """A factory: ``start_redis(extra_args=(), password=None)`` starts a
    redis-server on a free port (stopped when the test ends, whatever
    happened).  A missing redis-server fails the test: tests/run installs it."""
    servers = []

    def start(extra_args=(), password=None):
        directory = tmp_path_factory.mktemp("redis")
        try:
            server = RedisServer(directory, extra_args, password)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def redis_server(start_redis):
    """A redis-server with no password, on a free port."""
    return start_redis()


@pytest.fixture
def fake_redis():
    """A fake Redis (see redis_fixture.FakeRedis), closed at the end."""
    fake = FakeRedis()
    yield fake
    fake.close()


@pytest.fixture
def partition_proxy():
    """A factory: ``partition_proxy(port)`` is a PartitionProxy to ``port``,
    closed at the end."""
    proxies = []

    def start(port):
        proxies.append(PartitionProxy(port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()
