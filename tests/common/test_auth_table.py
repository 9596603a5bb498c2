"""Every RPC of the three services, read from the protos (a new RPC is covered by
itself), against the key policy: no token, an expired token, a token from an unknown
key, a key that may not grant the scope, the wrong scope, and the right one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest

from services.common.auth import KeyRing, TokenVerifier, load_key_policy, load_public_keys, mint_token
from services.common.db import Database
from services.common.metrics import Metrics
from services.common.server import ServiceHost
from services.common.settings import SettingsError
from tests.support.descriptors import SERVICE_FILES, Rpc, all_rpcs, default_answers
from tests.support.status import error_info
from tests.support.tokens import Keys, make_keys

RPCS = list(all_rpcs())


def write_policy(directory: Path, keys: dict[str, Keys]) -> Path:
    path = directory / "policy.toml"
    path.write_text(
        f"""
[[keys]]
kid = "app-backend-1"
public_key = "{keys["app"].public_path}"
subjects = ["app-backend"]
scopes = ["purchases:verify", "wallet:read", "wallet:gift", "wallet:limits", "payouts:request",
          "wallet:credit", "wallet:reserve", "payouts:ops", "wallet:purchases", "purchases:consent"]
max_lifetime_seconds = 3600

[[keys]]
kid = "reader-1"
public_key = "{keys["reader"].public_path}"
subjects = ["reader"]
scopes = ["wallet:read"]
"""
    )
    return path


@pytest.fixture
async def server(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[grpc.aio.Channel, dict[str, Keys]]]:
    keys = {}
    for name in ("app", "reader", "stranger"):
        (tmp_path / name).mkdir()
        keys[name] = make_keys(tmp_path / name)
    ring: KeyRing = load_key_policy(write_policy(tmp_path, keys))
    database = Database.from_url(sqlite_url, 1)
    host = ServiceHost(
        name="auth-table",
        files=list(SERVICE_FILES),
        register=lambda server: server.add_generic_rpc_handlers((default_answers(),)),
        database=database,
        verifier=TokenVerifier(ring),
        metrics=Metrics("auth-table"),
        bind="127.0.0.1:0",
        grace_seconds=0.5,
    )
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            yield channel, keys
    finally:
        await host.stop()
        database.close()


def token(keys: Keys, kid: str, subject: str, scopes: list[str], ttl: int = 600, iat: float | None = None) -> str:
    return mint_token(keys.private_key, subject, scopes, ttl, iat, kid=kid)


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
async def test_every_rpc_is_guarded_by_the_key_policy(
    server: tuple[grpc.aio.Channel, dict[str, Keys]], rpc: Rpc
) -> None:
    channel, keys = server
    call = channel.unary_unary(
        rpc.path,
        request_serializer=rpc.request_class.SerializeToString,
        response_deserializer=rpc.response_class.FromString,
    )
    other = "wallet:read" if rpc.scope != "wallet:read" else "wallet:gift"
    expired = token(keys["app"], "app-backend-1", "app-backend", [rpc.scope], ttl=60, iat=time.time() - 3600)
    cases: list[tuple[str, str | None, grpc.StatusCode, str]] = [
        ("no token", None, grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"),
        ("expired", expired, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
        (
            "unknown key",
            token(keys["stranger"], "stranger-1", "app-backend", [rpc.scope]),
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
        ),
        (
            "key without that scope",
            token(keys["reader"], "reader-1", "reader", [rpc.scope, "wallet:read"]),
            grpc.StatusCode.PERMISSION_DENIED,
            "KEY_SCOPE_NOT_ALLOWED",
        )
        if rpc.scope != "wallet:read"
        else (
            "key signing for another subject",
            token(keys["reader"], "reader-1", "app-backend", ["wallet:read"]),
            grpc.StatusCode.PERMISSION_DENIED,
            "KEY_SUBJECT_NOT_ALLOWED",
        ),
        (
            "wrong scope",
            token(keys["app"], "app-backend-1", "app-backend", [other]),
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_SCOPE",
        ),
    ]
    for case, bearer, code, reason in cases:
        metadata = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(rpc.request_class(), metadata=metadata, timeout=10)
        assert (case, caught.value.code(), error_info(caught.value).reason) == (case, code, reason)
    right = token(keys["app"], "app-backend-1", "app-backend", [rpc.scope])
    reply = await call(rpc.request_class(), metadata=(("authorization", f"Bearer {right}"),), timeout=10)
    assert reply == rpc.response_class()


async def test_tokens_need_a_kid_an_iat_and_a_bounded_lifetime(
    server: tuple[grpc.aio.Channel, dict[str, Keys]],
) -> None:
    channel, keys = server
    rpc = next(r for r in RPCS if r.name == "GetBalance")
    call = channel.unary_unary(
        rpc.path,
        request_serializer=rpc.request_class.SerializeToString,
        response_deserializer=rpc.response_class.FromString,
    )
    now = int(time.time())
    base = {"aud": "coinstore", "sub": "app-backend", "scope": "wallet:read", "iat": now, "exp": now + 600}
    app = keys["app"].private_key
    for name, bearer in [
        ("no kid", jwt.encode(base, app, algorithm="ES256")),
        (
            "no iat",
            jwt.encode(
                {k: v for k, v in base.items() if k != "iat"}, app, algorithm="ES256", headers={"kid": "app-backend-1"}
            ),
        ),
        (
            "lives two hours",
            jwt.encode({**base, "exp": now + 7200}, app, algorithm="ES256", headers={"kid": "app-backend-1"}),
        ),
        ("kid of another key", jwt.encode(base, app, algorithm="ES256", headers={"kid": "reader-1"})),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(rpc.request_class(), metadata=(("authorization", f"Bearer {bearer}"),), timeout=10)
        assert (name, caught.value.code()) == (name, grpc.StatusCode.UNAUTHENTICATED)
        # The caller learns that the token is not valid; why goes to the log.
        assert caught.value.details() == "the bearer token is not valid"


def policy_ring(tmp_path: Path, entries: str) -> KeyRing:
    path = tmp_path / "policy.toml"
    path.write_text(entries)
    return load_key_policy(path)


def test_act_only_from_keys_allowed_to_act_and_rotation_trusts_both_keys(tmp_path: Path) -> None:
    keys = {}
    for name in ("old", "new", "ops"):
        (tmp_path / name).mkdir()
        keys[name] = make_keys(tmp_path / name)
    ring = policy_ring(
        tmp_path,
        f"""
[[keys]]
kid = "app-2026-10"
public_key = "{keys["old"].public_path}"
subjects = ["app-backend"]
scopes = ["wallet:gift"]
may_act = true

[[keys]]
kid = "app-2026-11"
public_key = "{keys["new"].public_path}"
subjects = ["app-backend"]
scopes = ["wallet:gift"]
may_act = true

[[keys]]
kid = "ops-1"
public_key = "{keys["ops"].public_path}"
subjects = ["ops-alice"]
scopes = ["payouts:ops"]
max_lifetime_seconds = 900
""",
    )
    verifier = TokenVerifier(ring)
    # Rotation: both keys are trusted while callers move to the new one.
    for kid, key in (("app-2026-10", keys["old"]), ("app-2026-11", keys["new"])):
        caller = verifier.verify(
            "Bearer " + mint_token(key.private_key, "app-backend", ["wallet:gift"], 600, kid=kid, act="fan-42")
        )
        assert (caller.subject, caller.kid, caller.acting_for) == ("app-backend", kid, "fan-42")
    ops = mint_token(keys["ops"].private_key, "ops-alice", ["payouts:ops"], 600, kid="ops-1", act="someone-else")
    with pytest.raises(Exception) as caught:
        verifier.verify(f"Bearer {ops}")
    assert (getattr(caught.value, "reason", ""), getattr(caught.value, "metadata", {})) == (
        "KEY_ACT_NOT_ALLOWED",
        {"kid": "ops-1"},
    )
    # People's keys have short lifetimes.
    long_ops = mint_token(keys["ops"].private_key, "ops-alice", ["payouts:ops"], 3600, kid="ops-1")
    with pytest.raises(Exception) as caught:
        verifier.verify(f"Bearer {long_ops}")
    assert getattr(caught.value, "reason", "") == "INVALID_CREDENTIALS"


def test_without_a_policy_one_key_and_tokens_without_kid_keep_working(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    verifier = TokenVerifier(load_public_keys([keys.public_path]))
    caller = verifier.verify("Bearer " + mint_token(keys.private_key, "anyone", ["payouts:ops", "wallet:credit"], 600))
    assert caller.scopes == {"payouts:ops", "wallet:credit"}


@pytest.mark.parametrize(
    "entry",
    [
        'kid = ""\npublic_key = "k.pem"\nsubjects = ["a"]\nscopes = []',
        'kid = "k"\npublic_key = "k.pem"\nsubjects = []\nscopes = []',
        'kid = "k"\npublic_key = "k.pem"\nsubjects = ["a"]\nscopes = ["wallet:everything"]',
        'kid = "k"\npublic_key = "k.pem"\nsubjects = ["a"]\nscopes = []\nmax_lifetime_seconds = 999999',
    ],
)
def test_a_bad_policy_stops_start_up_naming_the_key(tmp_path: Path, entry: str) -> None:
    make_keys(tmp_path)
    (tmp_path / "k.pem").write_bytes((tmp_path / "public.pem").read_bytes())
    with pytest.raises(SettingsError, match=r"COINSTORE_AUTH_KEY_POLICY: .*keys\[0\]"):
        policy_ring(tmp_path, f"[[keys]]\n{entry}\n")


def test_the_token_command_refuses_lifetimes_longer_than_the_keys(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[keys]]\nkid = "ops-1"\npublic_key = "{keys.public_path}"\nsubjects = ["ops-alice"]\n'
        'scopes = ["payouts:ops"]\nmax_lifetime_seconds = 900\n'
    )
    env = {**os.environ, "COINSTORE_AUTH_KEY_POLICY": str(policy)}
    base = [sys.executable, "-m", "services.cli", "auth", "token", "--key", str(keys.private_path)]
    args = ["--subject", "ops-alice", "--scopes", "payouts:ops", "--kid", "ops-1"]
    refused = subprocess.run([*base, *args, "--ttl", "3600"], env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "between 1 and 900" in refused.stderr
    minted = subprocess.run([*base, *args, "--ttl", "900"], env=env, capture_output=True, text=True, check=False)
    assert minted.returncode == 0, minted.stderr
    assert TokenVerifier(load_key_policy(policy)).verify(f"Bearer {minted.stdout.strip()}").kid == "ops-1"
    no_policy = {k: v for k, v in os.environ.items() if k != "COINSTORE_AUTH_KEY_POLICY"}
    too_long = subprocess.run(
        [*base, *args, "--ttl", "7200"], env=no_policy, capture_output=True, text=True, check=False
    )
    assert too_long.returncode == 2
