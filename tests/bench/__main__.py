"""`make bench`: run every benchmark module in tests/bench and print a report.

Each ``tests/bench/bench_*.py`` defines ``run(args) -> list[Result]``. Benchmarks
are measured here, never in timed tests. ``make bench wallet`` (or
``make bench BENCH_ARGS="wallet --quick"``) runs only the named modules;
``--quick`` uses reduced sizes.

``make bench BASELINE=<git ref> wallet`` measures that commit too, in the same run:
the ref is checked out in a git worktree under ``var/bench/``, the working tree's
benchmark code is copied over its ``tests/`` (so both sides are driven by the same
client), and each module runs once against the baseline's services and once against
the working tree's, each in its own process whose imports come from that tree. Both
figures are printed with their ratio, so a change is always reported against the
baseline measured on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.bench.common import BenchArgs, Result

REPO = Path(__file__).resolve().parents[2]


def discover() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def run_modules(names: list[str], args: BenchArgs) -> list[Result]:
    results: list[Result] = []
    for name in names:
        module = importlib.import_module(f"tests.bench.bench_{name}")
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        for result in module.run(args):
            print("  " + result.line(), flush=True)
            results.append(result)
        print(f"   ({time.perf_counter() - started:.1f}s)", flush=True)
    return results


def _git(*argv: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def baseline_tree(ref: str) -> tuple[Path, str]:
    """A worktree of ``ref`` whose tests/ is this tree's (same benchmark client on both sides)."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tree = REPO / "var" / "bench" / f"baseline-{sha[:12]}"
    if not (tree / ".git").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        _git("worktree", "prune")
        _git("worktree", "add", "--detach", "--force", str(tree), sha)
    shutil.rmtree(tree / "tests")
    shutil.copytree(REPO / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    return tree, sha


def measure_in(tree: Path, label: str, names: list[str], passthrough: list[str]) -> list[dict[str, Any]]:
    """Run the named modules in a child process whose services, generated code and catalog come from ``tree``."""
    print(f"\n######## {label} ({tree})", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gen")])}
    try:
        subprocess.run(
            [sys.executable, "-m", "tests.bench", *names, *passthrough, "--json", str(out)],
            cwd=tree,
            env=env,
            check=True,
        )
        results: list[dict[str, Any]] = json.loads(out.read_text())
        return results
    finally:
        out.unlink(missing_ok=True)


def median_results(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per result (same position in every run), the run with the median rate."""
    if len(runs) == 1:
        return runs[0]
    merged = []
    for versions in zip(*runs, strict=False):
        ordered = sorted(versions, key=lambda r: r["per_second"])
        merged.append({**ordered[len(ordered) // 2], "rates": [round(r["per_second"], 1) for r in versions]})
    return merged


def compare(baseline: list[dict[str, Any]], current: list[dict[str, Any]], ref: str) -> list[str]:
    """One line per result present on both sides (matched by name and occurrence)."""

    def keyed(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
        seen: dict[str, int] = defaultdict(int)
        keys = {}
        for result in results:
            keys[(result["name"], seen[result["name"]])] = result
            seen[result["name"]] += 1
        return keys

    old, new = keyed(baseline), keyed(current)
    lines = [f"{'benchmark':<56} {'baseline ' + ref[:9]:>18} {'this tree':>12} {'ratio':>7}  p99 (ms)"]
    for key, result in new.items():
        before = old.get(key)
        if before is None:
            continue
        name = key[0] + (f" #{key[1] + 1}" if key[1] else "")
        ratio = result["per_second"] / before["per_second"] if before["per_second"] else float("nan")
        p99 = ""
        if before.get("p99_ms") is not None and result.get("p99_ms") is not None:
            p99 = f"{before['p99_ms']:.1f} -> {result['p99_ms']:.1f}"
        rates = f"{before['per_second']:>16.1f}/s {result['per_second']:>10.1f}/s"
        lines.append(f"{name:<56} {rates} {ratio:>6.2f}x  {p99}")
        if "rates" in before and "rates" in result:
            lines.append(f"{'':<8}rounds (ops/s): baseline {before['rates']}, this tree {result['rates']}")
        for note in sorted(set(before.get("notes", {})) & set(result.get("notes", {}))):
            if note.startswith(("vs_", "median_")):
                lines.append(f"{'':<8}{note}: {before['notes'][note]} -> {result['notes'][note]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("only", nargs="*", help=f"benchmarks to run (default: all of {', '.join(discover())})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL server the benchmarks create their databases on",
    )
    parser.add_argument(
        "--broker-url",
        default="redis://127.0.0.1:6379/14",
        help="Redis database the Google benchmark's Celery messages go to, emptied after it"
        " ('' or unreachable: the embedded SQLite broker)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="calls in flight in the end-to-end purchase runs (apple, google); the targets are at 64",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--baseline", metavar="REF", help="also measure this git commit, in the same run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --baseline: alternate baseline and this tree this many times; report each result's median",
    )
    parser.add_argument("--skip", action="append", default=[], help="leave out a part of a benchmark (e.g. memory)")
    ns = parser.parse_args()
    names = ns.only or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)} (have: {', '.join(discover())})")
    if ns.baseline:
        passthrough = [
            "--database-url",
            ns.database_url,
            f"--broker-url={ns.broker_url}",
            f"--concurrency={ns.concurrency}",
            *(["--quick"] if ns.quick else []),
            *(f"--skip={part}" for part in ns.skip),
        ]
        tree, sha = baseline_tree(ns.baseline)
        runs: dict[str, list[list[dict[str, Any]]]] = {"baseline": [], "current": []}
        # Alternate the sides, so a slow spell of this shared machine hits both.
        for round_number in range(1, ns.repeat + 1):
            label = f" (round {round_number} of {ns.repeat})" if ns.repeat > 1 else ""
            runs["baseline"].append(measure_in(tree, f"baseline {sha[:9]}{label}", names, passthrough))
            runs["current"].append(measure_in(REPO, f"this tree{label}", names, passthrough))
        baseline, current = median_results(runs["baseline"]), median_results(runs["current"])
        medians = f", medians of {ns.repeat} alternating rounds" if ns.repeat > 1 else ""
        print(f"\n######## this tree vs baseline {sha[:9]} (same run{medians})")
        for line in compare(baseline, current, sha):
            print("  " + line)
        if ns.json:
            ns.json.write_text(json.dumps({"baseline": sha, "before": baseline, "after": current}, indent=2))
        return 0
    args = BenchArgs(
        quick=ns.quick,
        admin_database_url=ns.database_url,
        skip=frozenset(ns.skip),
        broker_url=ns.broker_url,
        concurrency=ns.concurrency,
    )
    results = run_modules(names, args)
    if ns.json:
        ns.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
