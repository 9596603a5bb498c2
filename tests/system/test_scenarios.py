"""System scenarios: the real processes on PostgreSQL and a real broker, each
bounded in time and followed by `coinstore wallet audit` (tests/system/conftest.py)."""

from __future__ import annotations

import random

import pytest

from tests.system import scenarios
from tests.system.harness import System, run_demo

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_the_demo_journey_runs_to_the_end(system: System) -> None:
    output = run_demo(system)
    assert "PayPal paid 93.00 USD" in output
    assert "audit clean" in output


STORM_PURCHASES = 200


@pytest.mark.timeout(300)
def test_duplicate_storm_credits_each_purchase_once(system: System, seed: int) -> None:
    proof = scenarios.duplicate_storm(system, random.Random(seed), STORM_PURCHASES)
    assert proof.operations["purchases"] == STORM_PURCHASES


FUZZ_EXAMPLES = 20


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system_broker", ["redis"], indirect=True)
def test_abuse_gets_documented_answers_and_everything_keeps_serving(system: System, seed: int) -> None:
    rpcs = scenarios.fuzz_rpcs(system, seed, FUZZ_EXAMPLES)
    webhooks = scenarios.fuzz_webhooks(system, seed, FUZZ_EXAMPLES * 5)
    scenarios.check_serving(system)
    assert rpcs.operations["rpcs fuzzed"] >= 30
    assert sum(webhooks.operations.values()) == FUZZ_EXAMPLES * 5 * len(scenarios.WEBHOOKS)


@pytest.mark.timeout(300)
def test_crash_matrix_loses_nothing_and_pays_once(system: System, seed: int) -> None:
    proof = scenarios.crash_matrix(system, random.Random(seed))
    assert len([f for f in proof.faults if f.startswith("kill ")]) == len(scenarios.CRASH_POINTS)


@pytest.mark.timeout(300)
def test_dependency_faults_answer_unavailable_and_leave_nothing_half_applied(system: System, seed: int) -> None:
    proof = scenarios.dependency_faults(system, random.Random(seed))
    assert sum(proof.faults.values()) == 4
