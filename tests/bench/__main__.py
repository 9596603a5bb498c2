"""`make bench`: run every benchmark module in tests/bench and print a report.

Each ``tests/bench/bench_*.py`` defines ``run(args) -> list[Result]``. Benchmarks
are measured here, never in timed tests. ``make bench BENCH_ARGS="wallet --quick"``
runs only the named modules, with reduced sizes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from tests.bench.common import BenchArgs, Result


def discover() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("only", nargs="*", help=f"benchmarks to run (default: all of {', '.join(discover())})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL server the benchmarks create their databases on",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    ns = parser.parse_args()
    args = BenchArgs(quick=ns.quick, admin_database_url=ns.database_url)
    results: list[Result] = []
    for name in ns.only or discover():
        module = importlib.import_module(f"tests.bench.bench_{name}")
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        for result in module.run(args):
            print("  " + result.line(), flush=True)
            results.append(result)
        print(f"   ({time.perf_counter() - started:.1f}s)", flush=True)
    if ns.json:
        ns.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
