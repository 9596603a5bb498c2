"""wallet: coin provenance (lots, consumptions, clawback legs) and Sandbox as its own currencies.

Every credited purchase becomes a lot (``lot_id`` = credit sequence, ``open_coins``);
the environment joins the purchase key; reservations remember what clawbacks took;
history shows Sandbox deltas apart.

Existing data is carried over as far as it can be known. Lots are numbered in
credit order; each account's unspent real coins are assigned to its newest lots
(spending took the oldest first); what the account spent before provenance existed
is one ``UNTRACKED`` consumption per lot (no creator attribution: a refund of it
becomes the buyer's debt, as before), and each earlier clawback one ``UNSPENT`` leg
(it took the coins from the balance, whatever they had paid for), so a restore still
gives them back. The unspent coins of Sandbox lots move to
``SANDBOX_COIN`` in one balanced ``SANDBOX_SPLIT`` transaction per account; diamonds
given before provenance cannot be traced and stay real.

Revision ID: wallet_0003
Revises: wallet_0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "wallet_0003"
down_revision = "wallet_0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
PRE_PROVENANCE = "pre-provenance"
SPLIT_ACCOUNT = "#sys/sandbox_split"


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    if postgres:
        for table in ("wallet_entries", "wallet_balances"):
            op.alter_column(table, "currency", type_=sa.String(16), existing_type=sa.String(8))
    zero = sa.text("0")
    op.add_column(
        "wallet_history", sa.Column("sandbox_coins_delta", sa.BigInteger, nullable=False, server_default=zero)
    )
    op.add_column(
        "wallet_history", sa.Column("sandbox_diamonds_delta", sa.BigInteger, nullable=False, server_default=zero)
    )
    op.add_column(
        "wallet_reservations", sa.Column("clawed_diamonds", sa.BigInteger, nullable=False, server_default=zero)
    )
    with op.batch_alter_table("wallet_purchases", recreate="auto" if postgres else "always") as batch:
        batch.add_column(sa.Column("lot_id", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("open_coins", sa.BigInteger, nullable=False, server_default=zero))
    op.create_table(
        "wallet_consumptions",
        sa.Column("consumption_id", ID, primary_key=True, autoincrement=True),
        sa.Column("lot_id", sa.BigInteger, nullable=False),
        sa.Column("txn_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(160), nullable=False),
        sa.Column("environment", sa.String(16), nullable=False),
        sa.Column("creator_account_id", sa.String(160), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("clawed_coins", sa.BigInteger, nullable=False),
        sa.Column("clawed_diamonds", sa.BigInteger, nullable=False),
        sa.Column("undone_coins", sa.BigInteger, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("wallet_consumptions_lot", "wallet_consumptions", ["lot_id", "consumption_id"])
    # Restores look up an account's debt repayments; gifts, the bulk of the rows, skip this index.
    repayments = sa.text("kind = 'DEBT_REPAYMENT'")
    op.create_index(
        "wallet_consumptions_repayments",
        "wallet_consumptions",
        ["account_id", "consumption_id"],
        postgresql_where=repayments,
        sqlite_where=repayments,
    )
    op.create_table(
        "wallet_clawback_legs",
        sa.Column("leg_id", ID, primary_key=True, autoincrement=True),
        sa.Column("lot_id", sa.BigInteger, nullable=False),
        sa.Column("reversal_txn_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("consumption_id", sa.BigInteger, nullable=True),
        sa.Column("creator_account_id", sa.String(160), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("from_balance", sa.BigInteger, nullable=False),
        sa.Column("from_holds", sa.Text, nullable=False),
        sa.Column("diamond_debt", sa.BigInteger, nullable=False),
        sa.Column("restored_txn_id", sa.String(40), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("wallet_clawback_legs_lot", "wallet_clawback_legs", ["lot_id", "leg_id"])

    last_lot = _carry_over(bind)

    if postgres:
        op.alter_column("wallet_purchases", "lot_id", existing_type=sa.BigInteger, nullable=False)
        op.create_unique_constraint("wallet_purchases_lot_id", "wallet_purchases", ["lot_id"])
        op.drop_constraint("wallet_purchases_pkey", "wallet_purchases", type_="primary")
        op.create_primary_key(
            "wallet_purchases_pkey", "wallet_purchases", ["store", "environment", "store_transaction_id"]
        )
    else:
        # SQLite cannot change a primary key: the table is rebuilt from its new definition.
        with op.batch_alter_table("wallet_purchases", recreate="always", copy_from=_purchases_table()) as batch:
            batch.create_unique_constraint("wallet_purchases_lot_id", ["lot_id"])
    op.create_index(
        "wallet_purchases_open_lots",
        "wallet_purchases",
        ["account_id", "lot_id"],
        postgresql_where=sa.text("open_coins > 0"),
        sqlite_where=sa.text("open_coins > 0"),
    )
    if postgres:
        op.execute(f"CREATE SEQUENCE wallet_lot_ids START WITH {last_lot + 1}")
        op.execute("ALTER TABLE wallet_purchases ALTER COLUMN lot_id SET DEFAULT nextval('wallet_lot_ids')")
        op.execute("ALTER SEQUENCE wallet_lot_ids OWNED BY wallet_purchases.lot_id")


def _purchases_table() -> sa.Table:
    return sa.Table(
        "wallet_purchases",
        sa.MetaData(),
        sa.Column("store", sa.String(16), primary_key=True),
        sa.Column("environment", sa.String(16), primary_key=True),
        sa.Column("store_transaction_id", sa.String(512), primary_key=True),
        sa.Column("account_id", sa.String(160), nullable=False),
        sa.Column("product_id", sa.String(128), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("bonus_coins", sa.BigInteger, nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("storefront", sa.String(16), nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=False),
        sa.Column("price_currency", sa.String(3), nullable=False),
        sa.Column("purchase_time", TZ, nullable=True),
        sa.Column("flagged_for_review", sa.Boolean, nullable=False),
        sa.Column("credit_txn_id", sa.String(40), nullable=False),
        sa.Column("clawed_back", sa.BigInteger, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("lot_id", sa.BigInteger, nullable=False),
        sa.Column("open_coins", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )


def _carry_over(bind: Any) -> int:
    """Lots, untracked consumptions, clawback legs and the Sandbox split for existing purchases."""
    meta = sa.MetaData()
    purchases = sa.Table("wallet_purchases", meta, autoload_with=bind)
    balances = sa.Table("wallet_balances", meta, autoload_with=bind)
    consumptions = sa.Table("wallet_consumptions", meta, autoload_with=bind)
    legs = sa.Table("wallet_clawback_legs", meta, autoload_with=bind)
    transactions = sa.Table("wallet_transactions", meta, autoload_with=bind)
    entries = sa.Table("wallet_entries", meta, autoload_with=bind)
    rows = bind.execute(
        sa.select(purchases).order_by(purchases.c.created_at, purchases.c.store, purchases.c.store_transaction_id)
    ).all()
    coins = {
        r.account_id: int(r.balance) for r in bind.execute(sa.select(balances).where(balances.c.currency == "COIN"))
    }
    by_account: dict[str, list[Any]] = defaultdict(list)
    now = datetime.now(UTC)
    for lot_id, row in enumerate(rows, start=1):
        by_account[row.account_id].append((lot_id, row))
    for account_id, lots in by_account.items():
        unspent = max(coins.get(account_id, 0), 0)
        sandbox_open = 0
        for lot_id, row in reversed(lots):  # spending took the oldest first: what is left is the newest
            kept = int(row.coins) - int(row.clawed_back)
            open_coins = min(kept, unspent)
            unspent -= open_coins
            key = (
                (purchases.c.store == row.store)
                & (purchases.c.environment == row.environment)
                & (purchases.c.store_transaction_id == row.store_transaction_id)
            )
            bind.execute(purchases.update().where(key).values(lot_id=lot_id, open_coins=open_coins))
            common = {"lot_id": lot_id, "created_at": row.created_at}
            if kept - open_coins > 0:
                bind.execute(
                    consumptions.insert().values(
                        **common,
                        txn_id=PRE_PROVENANCE,
                        kind="UNTRACKED",
                        account_id=account_id,
                        environment=row.environment,
                        creator_account_id="",
                        coins=kept - open_coins,
                        diamonds=0,
                        clawed_coins=0,
                        clawed_diamonds=0,
                        undone_coins=0,
                    )
                )
            if int(row.clawed_back) > 0:
                bind.execute(
                    legs.insert().values(
                        **common,
                        reversal_txn_id=PRE_PROVENANCE,
                        kind="UNSPENT",
                        consumption_id=None,
                        creator_account_id="",
                        coins=int(row.clawed_back),
                        diamonds=0,
                        from_balance=0,
                        from_holds="[]",
                        diamond_debt=0,
                    )
                )
            if row.environment == "SANDBOX":
                sandbox_open += open_coins
        if sandbox_open:
            txn_id = uuid.uuid4().hex
            bind.execute(
                transactions.insert().values(
                    txn_id=txn_id, kind="SANDBOX_SPLIT", created_at=now, reference=account_id, sandbox=True
                )
            )
            for account, currency, amount in (
                (account_id, "COIN", -sandbox_open),
                (SPLIT_ACCOUNT, "COIN", sandbox_open),
                (account_id, "SANDBOX_COIN", sandbox_open),
                (SPLIT_ACCOUNT, "SANDBOX_COIN", -sandbox_open),
            ):
                bind.execute(
                    entries.insert().values(txn_id=txn_id, account_id=account, currency=currency, amount=amount)
                )
            bind.execute(
                balances.update()
                .where(balances.c.account_id == account_id, balances.c.currency == "COIN")
                .values(balance=balances.c.balance - sandbox_open)
            )
            bind.execute(balances.insert().values(account_id=account_id, currency="SANDBOX_COIN", balance=sandbox_open))
    return len(rows)


def downgrade() -> None:
    raise NotImplementedError("coin provenance cannot be undone without losing the lots' history")
