"""`make run`'s supervisor: every service reaches SERVING, and Ctrl-C stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import auth

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dev_run_serves_everything_and_stops_cleanly(tmp_path: Path) -> None:
    ports = _free_ports(9)
    names = [
        "RECEIPTS_GRPC",
        "WALLET_GRPC",
        "PAYOUTS_GRPC",
        "WEBHOOK",
        "STORESIM",
        "RECEIPTS_METRICS",
        "WALLET_METRICS",
        "PAYOUTS_METRICS",
    ]
    env = {**os.environ, **{f"COINSTORE_{n}_PORT": str(p) for n, p in zip(names, ports, strict=False)}}
    env.update(
        {
            "COINSTORE_DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}",
            "COINSTORE_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "COINSTORE_WALLET_ADDRESS": f"127.0.0.1:{ports[1]}",
            "COINSTORE_AUTH_SIGNING_KEY": str(tmp_path / "auth" / "private.pem"),
            "COINSTORE_AUTH_TRUSTED_KEYS": str(tmp_path / "auth" / "public.pem"),
            "COINSTORE_STORESIM_STATE_DIR": str(tmp_path / "storesim"),
            "COINSTORE_CATALOG": str(REPO_ROOT / "deploy" / "catalog.toml"),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "dev", "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        pending = {ports[0], ports[1], ports[2]}
        while pending and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            for port in list(pending):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    except grpc.RpcError:
                        continue
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(port)
            time.sleep(0.5)
        assert not pending, f"not SERVING within 60 s: {pending}"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "coinstore dev: stopped" in output
    assert auth.load_private_key(tmp_path / "auth" / "private.pem")


def test_auth_token_command_mints_a_verifiable_token(tmp_path: Path) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    run = [sys.executable, "-m", "services.cli", "auth"]
    subprocess.run(
        [*run, "keygen", "--private", str(private), "--public", str(public)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    token = subprocess.run(
        [*run, "token", "--subject", "app-backend", "--scopes", "wallet:read purchases:verify", "--key", str(private)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    caller = auth.TokenVerifier(auth.load_public_keys([public])).verify(f"Bearer {token}")
    assert caller.subject == "app-backend"
    assert caller.scopes == {"wallet:read", "purchases:verify"}
    bad = subprocess.run(
        [*run, "token", "--subject", "x", "--scopes", "wallet:everything", "--key", str(private)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "unknown scope" in bad.stderr
