"""A served request leaves no reference cycle behind.

Reference counting frees what a request allocated the moment it ends, unless its objects form
a cycle: then they wait for CPython's collector, whose young-generation passes pause the event
loop for tens of milliseconds with a thousand open streams (bench/README.md). One such cycle
(the response's rate-limit header hook holding the call that holds the responder) kept ~40
objects per request alive until the next collection.

The relay runs in this process here (``relay.server.serve`` under hypercorn, on the in-process
simulated upstream) so the collector's findings can be inspected: with ``DEBUG_SAVEALL`` every
object a collection finds unreachable is kept in ``gc.garbage`` instead of being freed.
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import subprocess
import sys

import httpx2
import trio

from relay.config import load_config
from relay.server import serve
from relay.testing.upstream import SimProfile, SimUpstream

from .conftest import ROOT, SIM_KEY, relay_config


def relay_garbage() -> collections.Counter[str]:
    """Objects of the relay's own classes on a reference cycle the collector found.

    Cycles through hypercorn's own objects are not counted: each connection is one (its
    TCPServer holds the protocol, which holds the TCPServer's send), and the relay's HTTP/1.1
    protocol is a subclass of hypercorn's, on that cycle as hypercorn's own class was.
    """
    gc.collect()
    garbage = {id(o): o for o in gc.garbage}
    return collections.Counter(
        type(o).__qualname__
        for o in gc.garbage
        if type(o).__module__.startswith("relay.")
        and not type(o).__module__.startswith("relay.testing")
        and _on_cycle(o, garbage)
    )


def _on_cycle(start: object, garbage: dict[int, object]) -> bool:
    """Whether ``start`` can reach itself through objects of ``garbage`` other than
    hypercorn's."""
    seen = {id(start)}
    frontier = [start]
    while frontier:
        for referent in gc.get_referents(frontier.pop()):
            if referent is start:
                return True
            if (
                id(referent) in garbage
                and id(referent) not in seen
                and not type(referent).__module__.startswith("hypercorn.")
            ):
                seen.add(id(referent))
                frontier.append(referent)
    return False


async def test_served_requests_leave_no_reference_cycle(tmp_path, nursery, monkeypatch) -> None:
    monkeypatch.setenv("SIM_UPSTREAM_KEY", SIM_KEY)
    sim = SimUpstream(SimProfile(ttft_s=0, token_delay_s=0, output_tokens=5, api_key=SIM_KEY))
    port = await nursery.start(sim.serve)
    path = tmp_path / "relay.toml"
    path.write_text(relay_config(f"http://127.0.0.1:{port}", tmp_path / "relay.db"))
    created = subprocess.run(
        [
            sys.executable, "-m", "relay", "keys", "create", "--config", str(path),
            "--package", "team", "--name", "cycles", "--json",
        ],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    key = json.loads(created.stdout)["key"]
    stop = trio.Event()
    thresholds = gc.get_threshold()
    url = await nursery.start(
        functools.partial(serve, load_config(path), shutdown_trigger=stop.wait)
    )
    chat = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
    try:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        async with httpx2.AsyncClient(
            base_url=url + "/v1", headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as client:
            for _ in range(5):
                answer = await client.post("/chat/completions", json=chat)
                assert answer.json()["usage"]["completion_tokens"] == 5
                async with client.stream(
                    "POST", "/chat/completions", json={**chat, "stream": True}
                ) as stream:
                    body = b"".join([piece async for piece in stream.aiter_bytes()])
                assert body.rstrip().endswith(b"data: [DONE]")
                missing = await client.post("/chat/completions", json={**chat, "model": "nope"})
                assert missing.status_code == 404
            # Failures: an upstream error streamed and not, and a malformed body.
            failing = [{"role": "user", "content": "#sim fault=500"}]
            for stream_flag in (False, True):
                failed = await client.post(
                    "/chat/completions", json={**chat, "messages": failing, "stream": stream_flag}
                )
                assert failed.status_code == 500
            malformed = await client.post("/chat/completions", content=b"{")
            assert malformed.status_code == 400
            # A client that leaves in the middle of a stream.
            paced = [{"role": "user", "content": "#sim tokens=500 delay=0.01"}]
            long = {**chat, "stream": True, "messages": paced}
            async with client.stream("POST", "/chat/completions", json=long) as stream:
                async for _ in stream.aiter_bytes():
                    break
        await trio.sleep(0.2)  # the relay notices the disconnect and cleans up
        found = relay_garbage()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        stop.set()
        gc.unfreeze()  # serve() froze this test process's heap and raised its thresholds
        gc.set_threshold(*thresholds)
    assert len(sim.requests) == 15  # each 500 was retried once (failover)
    assert found == {}, f"reference cycles of relay objects: {dict(found)}"
