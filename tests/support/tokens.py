"""Caller keys and tokens for tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from services.common import auth


@dataclass(frozen=True)
class Keys:
    private_path: Path
    public_path: Path
    private_key: ec.EllipticCurvePrivateKey

    def token(self, scopes: Iterable[str], subject: str = "test-caller", ttl: int = 600) -> str:
        return auth.mint_token(self.private_key, subject, scopes, ttl)

    def metadata(self, *scopes: str, subject: str = "test-caller") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(scopes, subject)}"),)


def make_keys(directory: Path) -> Keys:
    private_path, public_path = directory / "private.pem", directory / "public.pem"
    auth.generate_keypair(private_path, public_path)
    return Keys(private_path, public_path, auth.load_private_key(private_path))
