"""The shared guards' plain RESP connection (``relay/guards/resp.py``) against a real
``redis-server``: the script cache lost (a restarted Redis), a password and a database from the
URL, and a call cut off half-way (the next call must not read its reply)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.guards.resp import RespConnection, RespError, supported

from .conftest import RedisServer

ECHO = "return {tonumber(ARGV[1]) + 1, ARGV[2], {ARGV[1]}}"
SLOW = "local t = redis.call('TIME') local s = tonumber(t[1]) " \
       "while tonumber(redis.call('TIME')[1]) < s + 1 do end return 7"


@pytest.fixture
def redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_only_plain_tcp_urls_are_taken() -> None:
    assert supported("redis://127.0.0.1:6379/0")
    assert supported("redis://:secret@redis.internal:6380/2")
    assert not supported("rediss://redis.internal:6380")
    assert not supported("unix:///run/redis.sock")


async def test_a_script_redis_forgot_is_sent_again(redis: RedisServer) -> None:
    connection = RespConnection(redis.url)
    sha = connection.script(ECHO)
    try:
        assert await connection.evalsha(sha, ["41", "x"]) == [42, "x", ["41"]]
        redis.command("SCRIPT", "FLUSH")  # as after a restart
        assert await connection.evalsha(sha, ["1", "é"]) == [2, "é", ["1"]]
        with pytest.raises(RespError, match="attempt to perform arithmetic"):
            await connection.evalsha(connection.script("return ARGV[1] + {}"), ["1"])
        assert await connection.evalsha(sha, ["2", ""]) == [3, "", ["2"]]  # still usable
    finally:
        await connection.aclose()


async def test_password_and_database_come_from_the_url(redis: RedisServer) -> None:
    assert redis.command("CONFIG", "SET", "requirepass", "s3cret").startswith(b"+OK")
    select = "return redis.call('SET', 'probe', ARGV[1])"
    good = RespConnection(f"redis://:s3cret@127.0.0.1:{redis.port}/3")
    wrong = RespConnection(f"redis://:nope@127.0.0.1:{redis.port}/3")
    try:
        assert await good.evalsha(good.script(select), ["here"]) == "OK"
        with pytest.raises(RespError):
            await wrong.evalsha(wrong.script(select), ["there"])
    finally:
        await good.aclose()
        await wrong.aclose()
    with RedisServerAuth(redis, "s3cret") as probe:
        assert probe("SELECT", "3") == b"+OK\r\n"
        assert probe("GET", "probe") == b"$4\r\nhere\r\n"


async def test_a_call_cut_off_does_not_leave_its_reply_to_the_next(redis: RedisServer) -> None:
    connection = RespConnection(redis.url)
    slow, echo = connection.script(SLOW), connection.script(ECHO)
    try:
        await connection.evalsha(echo, ["0", "warm"])
        with trio.move_on_after(0.1) as scope:
            await connection.evalsha(slow, [])
        assert scope.cancelled_caught
        # A new connection: the cut-off call's 7 is never read as this one's answer (Redis
        # answers it once the slow script ends).
        assert await connection.evalsha(echo, ["5", "next"]) == [6, "next", ["5"]]
    finally:
        await connection.aclose()


class RedisServerAuth:
    """Raw commands on one authenticated connection (the fixture's ``command`` has no AUTH)."""

    def __init__(self, redis: RedisServer, password: str) -> None:
        self.redis, self.password = redis, password

    def __enter__(self):
        import socket

        self.conn = socket.create_connection(("127.0.0.1", self.redis.port), timeout=3)
        assert self("AUTH", self.password) == b"+OK\r\n"
        return self

    def __call__(self, *args: str) -> bytes:
        parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
        self.conn.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
        return self.conn.recv(1 << 16)

    def __exit__(self, *exc) -> None:
        self.conn.close()
