"""The Kubernetes manifests (deploy/k8s/coinstore.yaml) keep the trust model: every pod in
production mode with reflection off and nothing production mode refuses; each calling
service signs with its own key, mounted in its pods only, that its callee's policy lets
grant exactly what the service asks for; a key policy per trust domain; per-service
database roles, with only the migrate Job holding the schema owner's URL."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.auth import generate_keypair, load_key_policy
from services.common.settings import CommonSettings, load_settings
from services.payouts import wiring as payouts_wiring
from services.payouts.config import PayoutsSettings
from services.receipts import wiring as receipts_wiring
from services.receipts.config import ReceiptsSettings
from services.wallet.config import WalletSettings

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "coinstore.yaml"
SETTINGS: dict[str, type[CommonSettings]] = {
    "wallet": WalletSettings,
    "receipts": ReceiptsSettings,
    "payouts": PayoutsSettings,
}
# What each calling service asks its callee for, as its code says.
CALLS = {"receipts": ("wallet", receipts_wiring.WALLET_SCOPES), "payouts": ("wallet", payouts_wiring.WALLET_SCOPES)}
DOMAIN_SCOPES = {"wallet": "wallet:", "receipts": "purchases:", "payouts": "payouts:"}
# The variables each env Secret holds, as the manifest's header lists them (placeholder values).
SECRETS = {
    "coinstore-wallet-env": {
        "COINSTORE_DATABASE_URL": "postgresql://coinstore_wallet:pw@db/coinstore",
        "COINSTORE_WALLET_DATABASE_URL": "postgresql://coinstore_wallet:pw@db/coinstore",
    },
    "coinstore-receipts-env": {
        "COINSTORE_DATABASE_URL": "postgresql://coinstore_receipts:pw@db/coinstore",
        "COINSTORE_RECEIPTS_DATABASE_URL": "postgresql://coinstore_receipts:pw@db/coinstore",
        "COINSTORE_BROKER_URL": "redis://:pw@redis:6379/0",
        "COINSTORE_BINDING_SECRET": "a-long-random-production-secret-0123456789",
    },
    "coinstore-payouts-env": {
        "COINSTORE_DATABASE_URL": "postgresql://coinstore_payouts:pw@db/coinstore",
        "COINSTORE_PAYOUTS_DATABASE_URL": "postgresql://coinstore_payouts:pw@db/coinstore",
        "COINSTORE_BROKER_URL": "redis://:pw@redis:6379/0",
        "COINSTORE_PAYPAL_CLIENT_ID": "live-client-id",
        "COINSTORE_PAYPAL_CLIENT_SECRET": "live-client-secret",
    },
}


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


@dataclass(frozen=True)
class Pod:
    name: str
    service: str
    spec: dict[str, Any]

    @property
    def container(self) -> dict[str, Any]:
        (only,) = self.spec["containers"]
        return dict(only)

    def env(self) -> dict[str, str]:
        """The container's environment: ConfigMaps, its Secrets (placeholders), then its own env entries."""
        values: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            if "configMapRef" in source:
                values.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
            else:
                values.update(SECRETS.get(source["secretRef"]["name"], {}))
        values.update({e["name"]: str(e["value"]) for e in self.container.get("env", [])})
        return values

    def secrets(self) -> set[str]:
        found = {s["secretRef"]["name"] for s in self.container.get("envFrom", []) if "secretRef" in s}
        for volume in self.spec.get("volumes", []):
            if "secret" in volume:
                found.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    found.add(source["secret"]["name"])
        return found

    def files(self) -> dict[str, tuple[str, str, str]]:
        """Every file the pod mounts: path -> (kind, object name, key); '*' for a whole object."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        out: dict[str, tuple[str, str, str]] = {}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            sources = volume.get("projected", {}).get("sources") or [volume]
            for source in sources:
                for kind in ("configMap", "secret"):
                    ref = source.get(kind)
                    if ref is None:
                        continue
                    name = ref.get("name") or ref.get("secretName")
                    for item in ref.get("items") or [{"key": "*", "path": "*"}]:
                        out[f"{mount['mountPath']}/{item['path']}"] = (kind, name, item["key"])
        return out

    def mounts(self, path: str) -> bool:
        files = self.files()
        return path in files or any(p.endswith("/*") and path.startswith(p[:-1]) for p in files)


def pods() -> Iterator[Pod]:
    for doc in documents():
        if doc["kind"] == "Deployment":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            service = args[2].split(".")[1]
            yield Pod(doc["metadata"]["name"], service, doc["spec"]["template"]["spec"])


PODS = list(pods())
IDS = [p.name for p in PODS]


def policy_text(domain: str) -> str:
    return str(named("ConfigMap", "coinstore-key-policies")["data"][f"{domain}.toml"])


def policy(domain: str) -> list[dict[str, Any]]:
    return list(tomllib.loads(policy_text(domain))["keys"])


def test_every_service_has_its_pods() -> None:
    assert {p.service for p in PODS} == set(SETTINGS)
    assert {p.name for p in PODS} >= {"wallet", "receipts", "payouts", "receipts-worker", "payouts-worker"}


@pytest.mark.parametrize("pod", PODS, ids=IDS)
def test_production_mode_refuses_nothing_in_any_pod(pod: Pod, tmp_path: Path) -> None:
    env = pod.env()
    assert env["COINSTORE_ENVIRONMENT"] == "production"
    assert env.get("COINSTORE_GRPC_REFLECTION", "false") == "false"
    # The files its settings name are mounted in this pod.
    for variable in ("COINSTORE_CATALOG", "COINSTORE_AUTH_KEY_POLICY"):
        assert pod.mounts(env[variable]), (variable, env[variable])
    if pod.service == "receipts":
        for variable in (
            "COINSTORE_APPLE_ROOT_CERTS",
            "COINSTORE_APPLE_API_KEY_FILE",
            "COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE",
        ):
            assert pod.mounts(env[variable]), (variable, env[variable])
        # The checks read the service-account key (its token_uri): a stand-in for the Secret's file.
        account = tmp_path / "service-account.json"
        account.write_text(json.dumps({"type": "service_account", "token_uri": "https://oauth2.googleapis.com/token"}))
        env["COINSTORE_GOOGLE_SERVICE_ACCOUNT_FILE"] = str(account)
    else:
        assert not {"coinstore-apple", "coinstore-google"} & pod.secrets()
    settings = load_settings(SETTINGS[pod.service], env)
    assert settings.production
    assert settings.production_problems() == []


@pytest.mark.parametrize("pod", PODS, ids=IDS)
def test_only_callers_mount_a_signing_key_and_each_its_own(pod: Pod) -> None:
    env = pod.env()
    signing = {s for s in pod.secrets() if s.endswith("signing-key")}
    if pod.service not in CALLS:
        assert signing == set()
        assert "COINSTORE_AUTH_SIGNING_KEY" not in env  # nothing to sign with, nothing named
        return
    assert signing == {f"{pod.service}-signing-key"}
    assert pod.files()[env["COINSTORE_AUTH_SIGNING_KEY"]][:2] == ("secret", f"{pod.service}-signing-key")
    # Its callee trusts that key for this service's subject and exactly the scopes its code asks for.
    callee, scopes = CALLS[pod.service]
    kid = env["COINSTORE_AUTH_SIGNING_KEY_ID"]
    (entry,) = [k for k in policy(callee) if k["kid"] == kid]
    assert entry["subjects"] == [pod.service]
    assert set(entry["scopes"]) == set(scopes)
    assert not entry.get("may_act", False)
    # No other trust domain knows the key at all.
    for domain in SETTINGS:
        if domain != callee:
            assert kid not in {k["kid"] for k in policy(domain)}


def test_each_calling_service_has_its_own_key() -> None:
    kids = {p.service: p.env().get("COINSTORE_AUTH_SIGNING_KEY_ID") for p in PODS if p.service in CALLS}
    assert len(set(kids.values())) == len(CALLS)
    public = {(d, k["kid"]): k["public_key"] for d in SETTINGS for k in policy(d)}
    assert len({public[("wallet", kid)] for kid in kids.values() if kid}) == len(CALLS)


def test_key_policies_per_trust_domain(tmp_path: Path) -> None:
    for domain, prefix in DOMAIN_SCOPES.items():
        entries = policy(domain)
        # Each domain's keys grant only that service's scopes; only the app backend may act for others.
        assert all(scope.startswith(prefix) for k in entries for scope in k["scopes"]), domain
        assert {k["kid"] for k in entries if k.get("may_act")} <= {"app-backend-1"}
        # The file is a valid key policy (public keys generated here in its place).
        directory = tmp_path / domain
        for k in entries:
            generate_keypair(directory / f"{k['kid']}.key", directory / k["public_key"])
        (directory / "policy.toml").write_text(policy_text(domain))
        ring = load_key_policy(directory / "policy.toml")
        assert {key.kid for key in ring.keys} == {k["kid"] for k in entries}
    wallet = {k["kid"]: set(k["scopes"]) for k in policy("wallet")}
    assert [kid for kid, scopes in wallet.items() if "wallet:credit" in scopes] == ["receipts-1"]
    assert [kid for kid, scopes in wallet.items() if "wallet:reserve" in scopes] == ["payouts-1"]
    assert [k["kid"] for k in policy("payouts") if "payouts:ops" in k["scopes"]] == ["ops-1"]


@pytest.mark.parametrize("pod", PODS, ids=IDS)
def test_each_pod_mounts_its_own_trust_domain_policy_and_its_keys(pod: Pod) -> None:
    env = pod.env()
    policy_file = env["COINSTORE_AUTH_KEY_POLICY"]
    assert pod.files()[policy_file] == ("configMap", "coinstore-key-policies", f"{pod.service}.toml")
    directory = policy_file.rsplit("/", 1)[0]
    for k in policy(pod.service):
        assert pod.files()[f"{directory}/{k['public_key']}"][:2] == ("configMap", "coinstore-public-keys")


@pytest.mark.parametrize("pod", PODS, ids=IDS)
def test_each_pod_reaches_the_database_as_its_own_role(pod: Pod) -> None:
    assert {s for s in pod.secrets() if s.endswith("-env")} == {f"coinstore-{pod.service}-env"}
    env = pod.env()
    own = env[f"COINSTORE_{pod.service.upper()}_DATABASE_URL"]
    assert f"coinstore_{pod.service}:" in own
    assert env["COINSTORE_DATABASE_URL"] == own


def test_the_migrate_job_alone_owns_the_schema_and_grants_each_role() -> None:
    job = named("Job", "coinstore-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["coinstore", "migrate"]
    grants = [args[i + 1] for i, a in enumerate(args) if a == "--grant"]
    assert sorted(grants) == ["payouts=coinstore_payouts", "receipts=coinstore_receipts", "wallet=coinstore_wallet"]
    assert {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s} == {"coinstore-migrate-env"}
    assert all("coinstore-migrate-env" not in p.secrets() for p in PODS)
