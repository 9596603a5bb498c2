"""The outbound policy (services/common/outbound.py) against real servers on real
sockets, https with a local test CA: trust, no redirects, https only in production
(OCSP excepted), the response size cap while streaming, the total deadline; the
httplib2 adapter Google's client runs on; the Pub/Sub key fetch's cooldown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httplib2
import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from services.common.outbound import (
    OutboundPolicy,
    OutboundRefused,
    PolicyHttp,
    PolicySession,
    Reply,
    ResponseTooLarge,
)
from services.receipts.notifications.pubsub_auth import JwksCache, KeysUnavailable, TokenRejected
from tests.support.tls import LocalCA, make_test_ca, serve_in_thread

MIB = 1024 * 1024


@dataclass
class Server:
    https: str
    http: str
    hits: dict[str, int] = field(default_factory=dict)
    jwks_failing: bool = False
    jwks: dict[str, object] = field(default_factory=dict)
    in_flight: int = 0
    most_at_once: int = 0


def app(server: Server) -> web.Application:
    def count(request: web.Request) -> None:
        server.hits[request.path] = server.hits.get(request.path, 0) + 1

    async def ok(request: web.Request) -> web.Response:
        count(request)
        return web.Response(text="hello")

    async def redirect(request: web.Request) -> web.Response:
        count(request)
        raise web.HTTPFound("/ok")

    async def big_streamed(request: web.Request) -> web.StreamResponse:
        count(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(9):
            await response.write(b"x" * MIB)
        return response

    async def big_declared(request: web.Request) -> web.Response:
        count(request)
        return web.Response(body=b"x" * (2 * MIB))

    async def slow(request: web.Request) -> web.StreamResponse:
        count(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    async def pause(request: web.Request) -> web.Response:
        count(request)
        server.in_flight += 1
        server.most_at_once = max(server.most_at_once, server.in_flight)
        await asyncio.sleep(0.05)
        server.in_flight -= 1
        return web.Response(text="done")

    async def jwks(request: web.Request) -> web.Response:
        count(request)
        if server.jwks_failing:
            return web.Response(status=503)
        return web.json_response(server.jwks)

    application = web.Application()
    application.router.add_get("/ok", ok)
    application.router.add_get("/redirect", redirect)
    application.router.add_get("/big", big_streamed)
    application.router.add_get("/big-declared", big_declared)
    application.router.add_get("/slow", slow)
    application.router.add_get("/pause", pause)
    application.router.add_get("/jwks", jwks)
    return application


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca: LocalCA) -> Iterator[Server]:
    state = Server("", "")
    application = app(state)
    with serve_in_thread(application, ca.server_context()) as https_port, serve_in_thread(app(state)) as http_port:
        state.https, state.http = f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}"
        yield state


def test_trusts_certifi_plus_the_configured_ca(server: Server, ca: LocalCA) -> None:
    with OutboundPolicy().client(5) as client, pytest.raises(httpx.ConnectError):
        client.get(server.https + "/ok")
    with OutboundPolicy(ca_file=ca.ca_file).client(5) as client:
        assert client.get(server.https + "/ok").text == "hello"


async def test_the_async_client_follows_the_same_policy(server: Server, ca: LocalCA) -> None:
    async with OutboundPolicy().async_client(5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(server.https + "/ok")
    async with OutboundPolicy(ca_file=ca.ca_file, max_response_bytes=MIB).async_client(5) as client:
        assert (await client.get(server.https + "/ok")).text == "hello"
        reply = await client.get(server.https + "/redirect")
        assert reply.status_code == 302
        for path in ("/big", "/big-declared"):
            with pytest.raises(ResponseTooLarge):
                await client.get(server.https + path)
    async with OutboundPolicy(https_only=True, ca_file=ca.ca_file).async_client(1) as client:
        with pytest.raises(OutboundRefused):
            await client.get(server.http + "/ok")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.https + "/slow")


async def test_the_aiohttp_session_follows_the_same_policy(server: Server, ca: LocalCA) -> None:
    async def get(session: PolicySession, url: str) -> Reply:
        return await session.request("GET", url, body=None, headers={})

    untrusted = OutboundPolicy().session(5, connections=2)
    with pytest.raises(httpx.ConnectError):
        await get(untrusted, server.https + "/ok")
    await untrusted.aclose()
    session = OutboundPolicy(ca_file=ca.ca_file, max_response_bytes=MIB).session(2, connections=2)
    try:
        assert (await get(session, server.https + "/ok")).content == b"hello"
        redirect = await get(session, server.https + "/redirect")
        assert (redirect.status, redirect.headers["location"]) == (302, "/ok")
        # Over the cap (streamed or declared) or past the deadline: abandoned, and the
        # connection given back: eight exchanges after them still run, two at a time.
        for path in ("/big", "/big-declared", "/big", "/slow"):
            with pytest.raises((ResponseTooLarge, httpx.ReadTimeout)):
                await get(session, server.https + path)
        replies = await asyncio.gather(*(get(session, server.https + "/pause") for _ in range(8)))
    finally:
        await session.aclose()
    assert [r.content for r in replies] == [b"done"] * 8
    assert server.most_at_once == 2
    assert server.hits["/ok"] == 1  # the redirect to /ok was not followed
    production = OutboundPolicy(https_only=True, ca_file=ca.ca_file).session(1, connections=1)
    with pytest.raises(OutboundRefused):
        await get(production, server.http + "/ok")
    await production.aclose()


def test_redirects_are_not_followed(server: Server, ca: LocalCA) -> None:
    with OutboundPolicy(ca_file=ca.ca_file).client(5) as client:
        reply = client.get(server.https + "/redirect")
    assert (reply.status_code, reply.headers["location"]) == (302, "/ok")
    assert "/ok" not in server.hits


def test_production_speaks_https_only_except_where_http_is_the_protocol(server: Server, ca: LocalCA) -> None:
    production = OutboundPolicy(https_only=True, ca_file=ca.ca_file)
    with production.client(5) as client, pytest.raises(OutboundRefused):
        client.get(server.http + "/ok")
    assert "/ok" not in server.hits, "refused before connecting"
    with production.client(5) as client:
        assert client.get(server.https + "/ok").status_code == 200
    # OCSP is http by specification (its answers are signed).
    with production.client(5, plain_http_allowed=True) as client:
        assert client.get(server.http + "/ok").status_code == 200
    with OutboundPolicy().client(5) as client:
        assert client.get(server.http + "/ok").status_code == 200, "development talks to the simulator over http"


def test_responses_over_the_cap_are_abandoned_while_streaming(server: Server, ca: LocalCA) -> None:
    with OutboundPolicy(ca_file=ca.ca_file, max_response_bytes=MIB).client(30) as client:
        for path in ("/big", "/big-declared"):
            with pytest.raises(ResponseTooLarge):
                client.get(server.https + path)
        assert client.get(server.https + "/ok").text == "hello"
    with OutboundPolicy(ca_file=ca.ca_file, max_response_bytes=10 * MIB).client(30) as client:
        assert len(client.get(server.https + "/big").content) == 9 * MIB


def test_a_dripping_server_meets_the_total_deadline(server: Server, ca: LocalCA) -> None:
    # Every byte comes well within the read timeout; only the total deadline ends it.
    with OutboundPolicy(ca_file=ca.ca_file).client(1) as client, pytest.raises(httpx.ReadTimeout):
        client.get(server.https + "/slow")


def test_the_httplib2_adapter_keeps_the_policy(server: Server, ca: LocalCA) -> None:
    http = PolicyHttp(OutboundPolicy(ca_file=ca.ca_file, max_response_bytes=MIB), 5)
    response, content = http.request(server.https + "/ok")
    assert (response.status, content) == (200, b"hello")
    response, _ = http.request(server.https + "/redirect", redirections=5)
    assert response.status == 302
    assert server.hits["/ok"] == 1, "the redirect was not followed"
    with pytest.raises(httplib2.HttpLib2Error):
        http.request(server.https + "/big")
    with pytest.raises(httplib2.HttpLib2Error):
        PolicyHttp(OutboundPolicy(), 5).request(server.https + "/ok")
    http.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwk(kid: str) -> dict[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


def test_google_keys_cool_down_after_a_failure_and_stale_keys_keep_verifying(server: Server, ca: LocalCA) -> None:
    server.jwks = {"keys": [jwk("k1")]}
    clock = Clock()
    cache = JwksCache(
        server.https + "/jwks",
        max_age=3600,
        refresh_cooldown=10,
        failure_cooldown=30,
        fetch=OutboundPolicy(https_only=True, ca_file=ca.ca_file).get,
        clock=clock,
    )
    assert cache.key("k1") is not None
    assert server.hits["/jwks"] == 1
    # Stale, and the key server down: the keys held keep verifying.
    server.jwks_failing = True
    clock.now += 3601
    assert cache.key("k1") is not None
    assert server.hits["/jwks"] == 2
    # Within the cooldown nobody asks the key server again; a key we lack may be new: 503.
    for _ in range(5):
        assert cache.key("k1") is not None
        with pytest.raises(KeysUnavailable):
            cache.key("k-new")
    assert server.hits["/jwks"] == 2
    # After the cooldown it asks again, and learns the new key.
    server.jwks_failing = False
    server.jwks = {"keys": [jwk("k1"), jwk("k-new")]}
    clock.now += 30
    assert cache.key("k-new") is not None
    assert server.hits["/jwks"] == 3
    clock.now += 10
    with pytest.raises(TokenRejected):
        cache.key("forged")
    assert server.hits["/jwks"] == 4


def test_production_never_fetches_keys_over_http(server: Server, tmp_path: Path) -> None:
    cache = JwksCache(server.http + "/jwks", fetch=OutboundPolicy(https_only=True).get)
    with pytest.raises(KeysUnavailable):
        cache.key("k1")
    assert "/jwks" not in server.hits
