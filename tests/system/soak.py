"""`make soak SEED=… DURATION=…`: the system scenarios, long, on one running system.

Starts every process on a fresh PostgreSQL database of its own and a real broker
(``COINSTORE_TEST_DATABASE_URL``, ``COINSTORE_TEST_BROKER_URL``, as the tests), then
runs rounds until the duration is up: the seed fixes each round's scenario order,
the operation mix, the order of faults and which failpoints fire. The first round
is the demo and a duplicate storm of 2,000 purchases. `coinstore wallet audit`
runs after every scenario; any failure stops the soak and prints the seed and
round that replay it. At the end it prints what it proved.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support import env
from tests.support.databases import postgres_database
from tests.system import scenarios
from tests.system.harness import System, run_demo, running_system

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_BROKERS = "redis://127.0.0.1:6379/15,amqp://guest:guest@127.0.0.1:5672//"
SOAK_STORM = 2000
ROUND_STORM = 300
FUZZ_EXAMPLES = 40


def duration_seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m or 1h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def round_plan(rng: random.Random, number: int) -> list[str]:
    """The scenarios of round ``number``, in a seeded order (the first round starts
    with the newcomer's journey and the big storm)."""
    names = ["crash matrix", "dependency faults", "abuse", "storm"]
    rng.shuffle(names)
    return ["demo", "storm 2000", *[n for n in names if n != "storm"]] if number == 1 else names


def run_scenario(name: str, system: System, rng: random.Random) -> scenarios.Proof:
    seed = rng.getrandbits(31)
    runs: dict[str, Callable[[], scenarios.Proof]] = {
        "demo": lambda: _demo(system),
        "storm 2000": lambda: scenarios.duplicate_storm(system, rng, SOAK_STORM),
        "storm": lambda: scenarios.duplicate_storm(system, rng, ROUND_STORM),
        "crash matrix": lambda: scenarios.crash_matrix(system, rng),
        "dependency faults": lambda: scenarios.dependency_faults(system, rng, episodes=8),
        "abuse": lambda: _abuse(system, seed),
    }
    return runs[name]()


def _demo(system: System) -> scenarios.Proof:
    run_demo(system)
    proof = scenarios.Proof()
    proof.operations["demo journeys"] += 1
    return proof


def _abuse(system: System, seed: int) -> scenarios.Proof:
    proof = scenarios.fuzz_rpcs(system, seed, FUZZ_EXAMPLES)
    proof.add(scenarios.fuzz_webhooks(system, seed, FUZZ_EXAMPLES * 5))
    scenarios.check_serving(system)
    return proof


def soak(seed: int, seconds: float, broker: str, directory: Path) -> int:
    rng = random.Random(seed)
    total, audits, rounds, started = scenarios.Proof(), 0, 0, time.monotonic()
    ran: Counter[str] = Counter()
    print(f"soak: seed {seed}, {seconds:.0f}s, PostgreSQL + {broker}; logs in {directory}", flush=True)
    with postgres_database() as database, running_system(directory, database, env.server_broker_url(broker)) as system:
        while rounds == 0 or time.monotonic() - started < seconds:
            rounds += 1
            for name in round_plan(rng, rounds):
                began = time.monotonic()
                try:
                    proof = run_scenario(name, system, rng)
                    system.audit()
                except Exception:
                    traceback.print_exc()
                    print(
                        f"\nsoak FAILED in round {rounds}, scenario {name!r}: replay with make soak SEED={seed}"
                        f" DURATION={seconds:.0f}s (logs in {directory / 'logs'})",
                        file=sys.stderr,
                    )
                    return 1
                audits += 1
                ran[name] += 1
                total.add(proof)
                print(f"  round {rounds}: {name} ok in {time.monotonic() - began:.0f}s; audit clean", flush=True)
                if time.monotonic() - started >= seconds and rounds > 1:
                    break
    elapsed = time.monotonic() - started
    print(f"\nsoak passed: seed {seed}, {elapsed / 60:.1f} minutes, {rounds} rounds, PostgreSQL + {broker}")
    print("scenarios: " + ", ".join(f"{n} ×{c}" for n, c in sorted(ran.items())))
    print("operations:")
    for what, count in sorted(total.operations.items()):
        print(f"  {count:>9,}  {what}")
    print("faults injected:")
    for what, count in sorted(total.faults.items()):
        print(f"  {count:>9,}  {what}")
    print(f"audits passed: {audits} (coinstore wallet audit after every scenario, every one clean)")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.system.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="replay this seed (default: a new one, printed)")
    parser.add_argument("--duration", type=duration_seconds, default=duration_seconds("30m"), help="e.g. 90s, 15m, 1h")
    parser.add_argument("--broker", choices=sorted(env.SERVER_BROKERS), default="redis")
    args = parser.parse_args()
    os.environ.setdefault("COINSTORE_TEST_DATABASE_URL", DEFAULT_DATABASE)
    os.environ.setdefault("COINSTORE_TEST_BROKER_URL", DEFAULT_BROKERS)
    os.environ.setdefault("CI", "true")  # a missing server fails the soak instead of skipping it
    seed = args.seed or random.SystemRandom().randrange(1, 2**31)
    directory = Path(tempfile.mkdtemp(prefix=f"coinstore-soak-{seed}-"))
    raise SystemExit(soak(seed, args.duration, args.broker, directory))


if __name__ == "__main__":
    main()
