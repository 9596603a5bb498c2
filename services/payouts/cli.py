"""`coinstore payouts …`: ops commands over the payouts gRPC API (scope ``payouts:ops``).

The token comes from ``--token`` (production: issued to the operator by the
deployment's token issuer). Without it, the command mints a five-minute ops
token from ``COINSTORE_AUTH_SIGNING_KEY``, which works wherever that key is
trusted (development, or an ops host holding a key the services trust).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc

from coinstore.payouts.v1 import payout_service_pb2 as pb
from coinstore.payouts.v1 import payout_service_pb2_grpc as pb_grpc
from coinstore.type.v1 import actor_pb2
from services.common.actor import Actor
from services.common.catalog import from_minor

OPS_TOKEN_SECONDS = 300
CALL_TIMEOUT_SECONDS = 30.0
# Exit status of `status --timeout` when the batch has not completed by then.
STILL_RUNNING = 3
REPORT_COLUMNS = (
    "cashout_id",
    "creator_account_id",
    "diamonds",
    "amount",
    "currency",
    "rate",
    "receiver",
    "state",
    "failure_reason",
    "attempt",
    "sender_batch_id",
    "sender_item_id",
    "provider_batch_id",
    "provider_item_id",
    "provider_transaction_id",
    "requested_by",
    "requested_by_key_id",
    "requested_for",
    "request_id",
)
FINAL = (pb.CASHOUT_STATE_PAID, pb.CASHOUT_STATE_FAILED)


def _state(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


class Ops:
    def __init__(self, args: argparse.Namespace) -> None:
        self._channel = grpc.insecure_channel(args.address or _default_address())
        self.stub = pb_grpc.PayoutServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {args.token or _dev_token()}"),)

    def call(self, method: str, request: Any) -> Any:
        return getattr(self.stub, method)(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)

    def items(self, batch_id: str) -> Iterator[pb.Cashout]:
        token = ""
        while True:
            page = self.call(
                "ListBatchItems", pb.ListBatchItemsRequest(batch_id=batch_id, page_size=1000, page_token=token)
            )
            yield from page.cashouts
            token = page.next_page_token
            if not token:
                return


def _default_address() -> str:
    from services.common.settings import CommonSettings, load_settings

    return f"127.0.0.1:{load_settings(CommonSettings).payouts_grpc_port}"


def _dev_token() -> str:
    from services.common.auth import load_private_key, mint_token
    from services.common.settings import CommonSettings, load_settings

    settings = load_settings(CommonSettings)
    key = load_private_key(settings.auth_signing_key)
    return mint_token(key, "ops-cli", ("payouts:ops",), OPS_TOKEN_SECONDS, kid=settings.auth_signing_key_id)


def describe(batch: pb.PayoutBatch, out: TextIO) -> None:
    print(
        f"batch {batch.batch_id or '(dry run)'}  {_state(batch.state, pb.BatchState, 'BATCH_STATE_')}  "
        f"{batch.item_count} items  {batch.diamonds} diamonds  "
        f"{from_minor(batch.amount.amount_minor, batch.currency_code)} {batch.currency_code}",
        file=out,
    )
    for total in batch.totals:
        print(
            f"  {_state(total.state, pb.CashoutState, 'CASHOUT_STATE_'):<10} {total.count:>8} items  "
            f"{from_minor(total.amount.amount_minor, batch.currency_code)} {batch.currency_code}",
            file=out,
        )
    if batch.batch_id:
        print(f"  created by {_who(batch.created_by)}", file=out)


def cmd_create(args: argparse.Namespace) -> int:
    ops = Ops(args)
    request = pb.CreatePayoutBatchRequest(
        request_id=args.request_id or f"cli-{uuid.uuid4().hex}",
        currency_code=args.currency or "",
        max_items=args.max_items,
        dry_run=args.dry_run,
    )
    if args.cutoff:
        request.cutoff_time.FromDatetime(datetime.fromisoformat(args.cutoff).astimezone(UTC))
    reply = ops.call("CreatePayoutBatch", request)
    describe(reply.batch, sys.stdout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    ops = Ops(args)
    batch = ops.call("GetPayoutBatch", pb.GetPayoutBatchRequest(batch_id=args.batch)).batch
    finished = batch.state in (pb.BATCH_STATE_COMPLETED, pb.BATCH_STATE_CANCELLED)
    if not args.once:
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        with tqdm(total=batch.item_count, unit="item", desc=f"batch {args.batch}", file=sys.stderr) as bar:
            while True:
                settled = sum(t.count for t in batch.totals if t.state in FINAL)
                bar.update(settled - bar.n)
                finished = batch.state in (pb.BATCH_STATE_COMPLETED, pb.BATCH_STATE_CANCELLED)
                if finished or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(args.interval)
                batch = ops.call("GetPayoutBatch", pb.GetPayoutBatchRequest(batch_id=args.batch)).batch
    describe(batch, sys.stdout)
    # A script waiting on a batch (a parked submission never completes) learns it is still running.
    return 0 if finished or args.once else STILL_RUNNING


def cmd_list(args: argparse.Namespace) -> int:
    ops = Ops(args)
    reply = ops.call("ListPayoutBatches", pb.ListPayoutBatchesRequest(page_size=args.limit))
    for batch in reply.batches:
        created = batch.create_time.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
        print(
            f"{batch.batch_id}  {_state(batch.state, pb.BatchState, 'BATCH_STATE_'):<9}  {created}  "
            f"{batch.item_count:>7} items  {from_minor(batch.amount.amount_minor, batch.currency_code)} "
            f"{batch.currency_code}"
        )
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    ops = Ops(args)
    reply = ops.call(
        "RetryFailedItems",
        pb.RetryFailedItemsRequest(request_id=args.request_id or f"cli-{uuid.uuid4().hex}", batch_id=args.batch),
    )
    print(f"{reply.retried_count} failed items put into a new attempt")
    describe(reply.batch, sys.stdout)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    ops = Ops(args)
    reply = ops.call(
        "CancelPayoutBatch",
        pb.CancelPayoutBatchRequest(request_id=args.request_id or f"cli-{uuid.uuid4().hex}", batch_id=args.batch),
    )
    describe(reply.batch, sys.stdout)
    return 0


def _who(actor: actor_pb2.Actor) -> str:
    return Actor(actor.subject, actor.key_id, actor.acting_for, actor.request_id).describe()


def _when(stamp: Any) -> str:
    return str(stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"))


def _show_destination(creator: str, destination: pb.PayoutDestination) -> None:
    provider = pb.Provider.Name(destination.provider).removeprefix("PROVIDER_").lower()
    state = "verified" if destination.verified else "NOT verified"
    print(f"{creator}: {provider} {destination.receiver}  {state}  (as of {_when(destination.update_time)})")
    print(f"  set by      {_who(destination.changed_by)}")
    if destination.verified:
        print(f"  verified by {_who(destination.verified_by)}")


def cmd_destination(args: argparse.Namespace) -> int:
    ops = Ops(args)
    reply = ops.call("GetPayoutDestination", pb.GetPayoutDestinationRequest(creator_account_id=args.creator))
    _show_destination(args.creator, reply.destination)
    for change in reply.changes:
        kind = pb.DestinationChangeKind.Name(change.kind).removeprefix("DESTINATION_CHANGE_KIND_")
        print(f"  {_when(change.change_time)}  {kind:<6}  {change.receiver}  by {_who(change.changed_by)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the destination as it is now (or as ``--receiver`` names it), with a fresh
    request id, so the answer is never an earlier verification replayed."""
    ops = Ops(args)
    seen = ops.call("GetPayoutDestination", pb.GetPayoutDestinationRequest(creator_account_id=args.creator))
    receiver = args.receiver or seen.destination.receiver
    print(f"verifying {args.creator}: {receiver}")
    reply = ops.call(
        "VerifyPayoutDestination",
        pb.VerifyPayoutDestinationRequest(
            request_id=f"cli-verify-{uuid.uuid4().hex}",
            creator_account_id=args.creator,
            provider=seen.destination.provider,
            receiver=receiver,
        ),
    )
    _show_destination(args.creator, reply.destination)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    ops = Ops(args)
    out: TextIO = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.csv:
            writer = csv.writer(out)
            writer.writerow(REPORT_COLUMNS)
            for c in ops.items(args.batch):
                writer.writerow(
                    [
                        c.cashout_id,
                        c.creator_account_id,
                        c.diamonds,
                        from_minor(c.amount.amount_minor, c.amount.currency_code),
                        c.amount.currency_code,
                        c.rate,
                        c.destination.receiver,
                        _state(c.state, pb.CashoutState, "CASHOUT_STATE_"),
                        c.failure_reason,
                        c.attempt,
                        c.sender_batch_id,
                        c.sender_item_id,
                        c.provider_batch_id,
                        c.provider_item_id,
                        c.provider_transaction_id,
                        c.requested_by.subject,
                        c.requested_by.key_id,
                        c.requested_by.acting_for,
                        c.requested_by.request_id,
                    ]
                )
        else:
            describe(ops.call("GetPayoutBatch", pb.GetPayoutBatchRequest(batch_id=args.batch)).batch, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _guard(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except grpc.RpcError as error:
            print(f"coinstore payouts: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("payouts", help="payout batches (ops; scope payouts:ops)")
    parser.add_argument("--address", default="", help="payouts service host:port (default 127.0.0.1:PAYOUTS_GRPC_PORT)")
    parser.add_argument(
        "--token", default="", help="bearer token with payouts:ops (default: minted from COINSTORE_AUTH_SIGNING_KEY)"
    )

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(handler=show_help)
    sub = parser.add_subparsers(dest="payouts_command")

    p = sub.add_parser("create-batch", help="claim requested cash-outs into a batch and start paying it")
    p.add_argument("--dry-run", action="store_true", help="only report what the batch would hold")
    p.add_argument("--currency", help="payout currency (default: the catalog's default)")
    p.add_argument("--max-items", type=int, default=0, help="cap on items (0 = all eligible)")
    p.add_argument("--cutoff", help="only cash-outs requested before this ISO time (default: now)")
    p.add_argument("--request-id", help="idempotency key; reuse it to retry safely (default: random)")
    p.set_defaults(handler=_guard(cmd_create))

    p = sub.add_parser("status", help="a batch's progress (live bar until it completes)")
    p.add_argument("batch")
    p.add_argument("--once", action="store_true", help="print the current totals and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help=f"give up after this many seconds, print the totals, exit {STILL_RUNNING} (0: wait until it completes)",
    )
    p.set_defaults(handler=_guard(cmd_status))

    p = sub.add_parser("list", help="recent batches, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=_guard(cmd_list))

    p = sub.add_parser("retry", help="pay a batch's failed items again (new attempt, new hold)")
    p.add_argument("batch")
    p.add_argument("--request-id")
    p.set_defaults(handler=_guard(cmd_retry))

    p = sub.add_parser("cancel", help="cancel a batch before it is submitted")
    p.add_argument("batch")
    p.add_argument("--request-id")
    p.set_defaults(handler=_guard(cmd_cancel))

    p = sub.add_parser("destination", help="a creator's payout destination and who changed and verified it")
    p.add_argument("creator")
    p.set_defaults(handler=_guard(cmd_destination))

    p = sub.add_parser(
        "verify-destination", help="mark a creator's payout destination verified (refused if it changed meanwhile)"
    )
    p.add_argument("creator")
    p.add_argument("--receiver", help="the receiver you checked (default: the one the service shows now)")
    p.set_defaults(handler=_guard(cmd_verify))

    p = sub.add_parser("report", help="a batch's totals, or one CSV row per item for finance")
    p.add_argument("batch")
    p.add_argument("--csv", action="store_true", help="one row per item")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.set_defaults(handler=_guard(cmd_report))
