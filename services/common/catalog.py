"""The product and gift catalog: coin packs per store, gifts, promotions,
diamond rules and payout rules, loaded from TOML and validated at start-up.

A bad catalog stops start-up with a :class:`CatalogError` naming the entry.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

# ISO 4217 minor-unit exponents for the currencies the catalog may price in.
CURRENCY_EXPONENTS: Mapping[str, int] = {
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "CAD": 2,
    "AUD": 2,
    "CHF": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "BRL": 2,
    "MXN": 2,
    "INR": 2,
    "CNY": 2,
    "HKD": 2,
    "SGD": 2,
    "TWD": 2,
    "THB": 2,
    "JPY": 0,
    "KRW": 0,
    "VND": 0,
    "IDR": 2,
    "TRY": 2,
    "ZAR": 2,
    "NZD": 2,
}


class CatalogError(Exception):
    """The catalog is invalid; the message names the offending entry."""


class StoreId(enum.Enum):
    APP_STORE = "app_store"
    GOOGLE_PLAY = "google_play"


@dataclass(frozen=True)
class Price:
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class CoinPack:
    store: StoreId
    product_id: str
    coins: int
    price: Price


@dataclass(frozen=True)
class Gift:
    gift_id: str
    name: str
    coin_price: int
    # Diamonds per coin of the price for this gift; None means the catalog default.
    diamonds_per_coin: Fraction | None = None


@dataclass(frozen=True)
class Promotion:
    promotion_id: str
    store: StoreId | None
    product_id: str
    bonus_coins: int
    starts: datetime
    ends: datetime

    def active_at(self, moment: datetime) -> bool:
        return self.starts <= moment < self.ends


@dataclass(frozen=True)
class DiamondRules:
    # Diamonds the creator gets per coin of a gift's price, an exact rational
    # rate; each gift's diamonds are rounded down and the remainder stays with
    # the platform as gift revenue.
    diamonds_per_coin: Fraction
    # Days before earned diamonds can be cashed out (refunds can still be absorbed).
    holding_days: int


@dataclass(frozen=True)
class PayoutRules:
    default_currency: str
    # Cash value of one diamond per payout currency (exact Decimal; amounts round down).
    rates: Mapping[str, Decimal]
    minimum_diamonds: int
    # Most a creator can cash out per UTC day, in minor units per currency.
    daily_limit_minor: Mapping[str, int]


@dataclass(frozen=True)
class Catalog:
    packs: tuple[CoinPack, ...]
    gifts: tuple[Gift, ...]
    promotions: tuple[Promotion, ...]
    diamonds: DiamondRules
    payouts: PayoutRules

    def pack(self, store: StoreId, product_id: str) -> CoinPack | None:
        for pack in self.packs:
            if pack.store is store and pack.product_id == product_id:
                return pack
        return None

    def packs_for(self, store: StoreId) -> tuple[CoinPack, ...]:
        return tuple(p for p in self.packs if p.store is store)

    def gift(self, gift_id: str) -> Gift | None:
        for gift in self.gifts:
            if gift.gift_id == gift_id:
                return gift
        return None

    def promotion_for(self, store: StoreId, product_id: str, moment: datetime) -> Promotion | None:
        for promotion in self.promotions:
            if promotion.product_id == product_id and promotion.store in (None, store) and promotion.active_at(moment):
                return promotion
        return None

    def diamonds_for_gift(self, gift: Gift, count: int) -> int:
        """Diamonds for ``count`` of ``gift``, rounded down per gift."""
        rate = gift.diamonds_per_coin if gift.diamonds_per_coin is not None else self.diamonds.diamonds_per_coin
        per_gift = (gift.coin_price * rate.numerator) // rate.denominator
        return per_gift * count


def to_minor(amount: str | int | float, currency: str, where: str) -> int:
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise CatalogError(f"{where}: unknown currency {currency!r}")
    if isinstance(amount, float):
        raise CatalogError(f'{where}: write the price as a string such as "1.29", not a float')
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise CatalogError(f"{where}: price {amount!r} is not a decimal") from None
    scaled = value.scaleb(exponent)
    if scaled != scaled.to_integral_value() or value <= 0:
        raise CatalogError(f"{where}: price {amount} is not a positive amount in whole {currency} minor units")
    return int(scaled)


def from_minor(amount_minor: int, currency: str) -> str:
    """Minor units as the currency's decimal text (1234 USD -> "12.34", 500 JPY -> "500")."""
    exponent = CURRENCY_EXPONENTS.get(currency, 2)
    return str(Decimal(amount_minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent)))


def _rational(raw: Any, where: str) -> Fraction:
    if isinstance(raw, float):
        raise CatalogError(f'{where}: write the rate as a string such as "1/2", not a float')
    try:
        rate = Fraction(str(raw))
    except (ValueError, ZeroDivisionError):
        raise CatalogError(f'{where}: {raw!r} is not an exact rate such as "1" or "1/2"') from None
    if rate < 0:
        raise CatalogError(f"{where}: rate must not be negative")
    return rate


def _positive_int(raw: Any, where: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
        raise CatalogError(f"{where}: must be a positive integer, got {raw!r}")
    return raw


def _text(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise CatalogError(f"{where}: must be a non-empty string")
    return raw


def _store(raw: Any, where: str) -> StoreId:
    try:
        return StoreId(raw)
    except ValueError:
        raise CatalogError(f"{where}: store must be app_store or google_play, got {raw!r}") from None


def _time(raw: Any, where: str) -> datetime:
    if isinstance(raw, datetime):
        if raw.tzinfo is None:
            raise CatalogError(f"{where}: give a UTC offset (e.g. 2026-01-01T00:00:00Z)")
        return raw.astimezone(UTC)
    raise CatalogError(f"{where}: must be a TOML date-time with offset")


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    packs: list[CoinPack] = []
    seen_packs: set[tuple[StoreId, str]] = set()
    for i, raw in enumerate(data.get("packs", [])):
        where = f"packs[{i}]"
        store = _store(raw.get("store"), where)
        product_id = _text(raw.get("product_id"), f"{where}.product_id")
        where = f"pack {product_id} ({store.value})"
        if (store, product_id) in seen_packs:
            raise CatalogError(f"{where}: duplicate product id")
        seen_packs.add((store, product_id))
        currency = _text(raw.get("currency", "USD"), f"{where}.currency")
        packs.append(
            CoinPack(
                store,
                product_id,
                _positive_int(raw.get("coins"), f"{where}.coins"),
                Price(to_minor(raw.get("price", ""), currency, f"{where}.price"), currency),
            )
        )
    if not packs:
        raise CatalogError("packs: the catalog sells no coin packs")

    diamonds_raw = data.get("diamonds", {})
    diamond_rules = DiamondRules(
        diamonds_per_coin=_rational(diamonds_raw.get("per_coin", "1"), "diamonds.per_coin"),
        holding_days=int(diamonds_raw.get("holding_days", 7)),
    )
    if diamond_rules.holding_days < 0:
        raise CatalogError("diamonds.holding_days: must not be negative")

    gifts: list[Gift] = []
    seen_gifts: set[str] = set()
    for i, raw in enumerate(data.get("gifts", [])):
        gift_id = _text(raw.get("id"), f"gifts[{i}].id")
        where = f"gift {gift_id}"
        if gift_id in seen_gifts:
            raise CatalogError(f"{where}: duplicate gift id")
        seen_gifts.add(gift_id)
        rate = raw.get("diamonds_per_coin")
        gifts.append(
            Gift(
                gift_id,
                _text(raw.get("name"), f"{where}.name"),
                _positive_int(raw.get("coin_price"), f"{where}.coin_price"),
                _rational(rate, f"{where}.diamonds_per_coin") if rate is not None else None,
            )
        )

    promotions: list[Promotion] = []
    for i, raw in enumerate(data.get("promotions", [])):
        promotion_id = _text(raw.get("id"), f"promotions[{i}].id")
        where = f"promotion {promotion_id}"
        promo_store = _store(raw["store"], f"{where}.store") if "store" in raw else None
        product_id = _text(raw.get("product_id"), f"{where}.product_id")
        if not any(p.product_id == product_id and promo_store in (None, p.store) for p in packs):
            raise CatalogError(f"{where}: product {product_id} is not a coin pack in the catalog")
        starts = _time(raw.get("starts"), f"{where}.starts")
        ends = _time(raw.get("ends"), f"{where}.ends")
        if ends <= starts:
            raise CatalogError(f"{where}: ends must be after starts")
        promotions.append(
            Promotion(
                promotion_id,
                promo_store,
                product_id,
                _positive_int(raw.get("bonus_coins"), f"{where}.bonus_coins"),
                starts,
                ends,
            )
        )

    payouts_raw = data.get("payouts", {})
    default_currency = _text(payouts_raw.get("default_currency", "USD"), "payouts.default_currency")
    rates: dict[str, Decimal] = {}
    for currency, raw_rate in payouts_raw.get("rates", {"USD": "0.005"}).items():
        where = f"payouts.rates.{currency}"
        if currency not in CURRENCY_EXPONENTS:
            raise CatalogError(f"{where}: unknown currency")
        if not isinstance(raw_rate, str):
            raise CatalogError(f'{where}: write the rate as a string such as "0.005"')
        try:
            rate = Decimal(raw_rate)
        except InvalidOperation:
            raise CatalogError(f"{where}: {raw_rate!r} is not a decimal") from None
        if rate <= 0:
            raise CatalogError(f"{where}: must be positive")
        rates[currency] = rate
    if default_currency not in rates:
        raise CatalogError(f"payouts.default_currency: no rate for {default_currency}")
    limits: dict[str, int] = {}
    for currency, raw_limit in payouts_raw.get("daily_limit", {"USD": "1000.00"}).items():
        limits[currency] = to_minor(raw_limit, currency, f"payouts.daily_limit.{currency}")
    payout_rules = PayoutRules(
        default_currency=default_currency,
        rates=rates,
        minimum_diamonds=_positive_int(payouts_raw.get("minimum_diamonds", 10_000), "payouts.minimum_diamonds"),
        daily_limit_minor=limits,
    )
    return Catalog(tuple(packs), tuple(gifts), tuple(promotions), diamond_rules, payout_rules)


def load_catalog(path: Path) -> Catalog:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise CatalogError(f"COINSTORE_CATALOG: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"COINSTORE_CATALOG: {path} is not valid TOML: {exc}") from None
    try:
        return parse_catalog(data)
    except CatalogError as exc:
        raise CatalogError(f"catalog {path}: {exc}") from None
    except (TypeError, AttributeError, KeyError) as exc:
        raise CatalogError(f"catalog {path}: malformed entry ({exc})") from None
