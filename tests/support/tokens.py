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
    kid: str = ""

    def token(self, scopes: Iterable[str], subject: str = "test-caller", ttl: int = 600, act: str = "") -> str:
        if self.kid or act:
            return auth.mint_token(self.private_key, subject, scopes, ttl, kid=self.kid, act=act)
        # Without them, the call older auth modules know too (`make bench BASELINE=` runs this file there).
        return auth.mint_token(self.private_key, subject, scopes, ttl)

    def metadata(self, *scopes: str, subject: str = "test-caller", act: str = "") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(scopes, subject, act=act)}"),)


def make_keys(directory: Path, kid: str = "") -> Keys:
    private_path, public_path = directory / "private.pem", directory / "public.pem"
    auth.generate_keypair(private_path, public_path)
    return Keys(private_path, public_path, auth.load_private_key(private_path), kid)


@dataclass(frozen=True)
class Grant:
    """One [[keys]] entry of a key policy: what tokens signed by ``keys`` may assert."""

    keys: Keys
    subjects: tuple[str, ...]
    scopes: tuple[str, ...]
    may_act: bool = False


def write_key_policy(path: Path, grants: Iterable[Grant]) -> Path:
    def strings(values: Iterable[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    path.write_text(
        "".join(
            f'[[keys]]\nkid = "{g.keys.kid}"\npublic_key = "{g.keys.public_path}"\n'
            f"subjects = {strings(g.subjects)}\nscopes = {strings(g.scopes)}\n"
            f"may_act = {'true' if g.may_act else 'false'}\n\n"
            for g in grants
        )
    )
    return path
