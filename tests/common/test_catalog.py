"""The catalog: the shipped one loads; bad entries are refused by name."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from services.common.catalog import CatalogError, StoreId, load_catalog, parse_catalog

CATALOG = Path(__file__).resolve().parents[2] / "deploy" / "catalog.toml"


def base() -> dict[str, Any]:
    return tomllib.loads(CATALOG.read_text())


def test_shipped_catalog_has_the_market_price_points() -> None:
    catalog = load_catalog(CATALOG)
    pack = catalog.pack(StoreId.APP_STORE, "com.coinstore.coins.70")
    assert pack is not None
    assert (pack.coins, pack.price.amount_minor, pack.price.currency) == (70, 129, "USD")
    android = catalog.pack(StoreId.GOOGLE_PLAY, "coins_7000")
    assert android is not None
    assert (android.coins, android.price.amount_minor) == (7000, 11999)
    assert catalog.payouts.rates["USD"] * 200 == 1
    assert catalog.payouts.minimum_diamonds == 10_000
    assert catalog.payouts.daily_limit_minor["USD"] == 100_000


def test_gift_diamonds_round_down_per_gift() -> None:
    data = base()
    data["diamonds"]["per_coin"] = "1/3"
    catalog = parse_catalog(data)
    panda = catalog.gift("panda")
    assert panda is not None
    assert catalog.diamonds_for_gift(panda, 1) == 1  # 5/3 rounds down
    assert catalog.diamonds_for_gift(panda, 3) == 3  # per gift, not per batch


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["packs"][0].update(coins=-5),
            r"pack com.coinstore.coins.70 \(app_store\).coins: must be a positive integer",
        ),
        (lambda d: d["packs"][1].update(price=1.5), "float"),
        (lambda d: d["packs"][2].update(price="1.234"), "minor units"),
        (lambda d: d["packs"][0].update(store="steam"), "store must be"),
        (lambda d: d["packs"].append(dict(d["packs"][0])), "duplicate product id"),
        (lambda d: d["gifts"][0].update(coin_price=0), "gift rose"),
        (lambda d: d["promotions"][0].update(product_id="nope"), "promotion winter-2026"),
        (lambda d: d["diamonds"].update(per_coin="x"), "diamonds.per_coin"),
        (lambda d: d["payouts"]["rates"].update(USD="abc"), r"payouts.rates.USD"),
    ],
)
def test_bad_entries_are_named(mutate: Any, message: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(CatalogError, match=message):
        parse_catalog(data)


def test_unreadable_catalog_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="COINSTORE_CATALOG"):
        load_catalog(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("packs = [")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(bad)
