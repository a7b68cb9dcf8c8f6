"""Run every benchmark script in sequence (``make bench`` calls this).

Runs ``bench_skymap.py``, ``bench_fits_sink.py`` and ``bench_harvest.py`` (then any
other ``bench_*.py`` in this folder) with this Python, from the project root, one
after the other, and reports which failed. Each script prints its own summary and
writes its own results (see benchmarks/README.md).

Usage::

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...]

``--quick`` is passed to the scripts that accept it (bench_harvest.py) for a short
run; scripts without it run with their defaults.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ("bench_skymap.py", "bench_fits_sink.py", "bench_harvest.py")


def scripts() -> list[Path]:
    found = {p.name: p for p in HERE.glob("bench_*.py")}
    first = [found.pop(name) for name in ORDER if name in found]
    return first + [found[name] for name in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs where supported")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these scripts (e.g. bench_harvest)"
    )
    args = parser.parse_args(argv)

    todo = scripts()
    if args.only:
        wanted = {n if n.endswith(".py") else f"{n}.py" for n in args.only}
        todo = [p for p in todo if p.name in wanted]
    failed: list[str] = []
    summary: list[str] = []
    for script in todo:
        cmd = [sys.executable, str(script)]
        if args.quick and '"--quick"' in script.read_text():
            cmd.append("--quick")
        print(f"==> {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
        sys.stdout.flush()
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        dt = time.perf_counter() - t0
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        summary.append(f"{script.name:<24} {status:<16} {dt:7.1f} s")
        if rc != 0:
            failed.append(script.name)
        print()
    print("benchmarks:")
    for line in summary:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
