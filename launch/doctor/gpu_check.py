"""``python -m eossl.launch.doctor.gpu_check``: the GPU check a maintainer runs, written to one JSON file.

Runs, each as its own process with a time bound (about 8 minutes in all on one GPU): ``eossl doctor
--json``, ``pytest -m gpu``, and ``eossl bench train`` and ``bench loader`` when DALI is installed (both
stream a dataset through DALI; without it the doctor's compute-only throughput is the training figure).
A part that cannot run here is recorded as skipped with the reason; the file's ``ok`` is true when every
part that ran exited 0. ``make gpu-check`` calls this.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .report import missing

__all__ = ["gpu_check", "main"]

# Seconds each part may take: together under 8 minutes.
LIMITS = {"doctor": 150, "pytest_gpu": 150, "bench_train": 120, "bench_loader": 60}


def _json_result(text: str) -> dict | None:
    """The command's JSON report: all of stdout (the doctor's, indented) or its last line that is a JSON
    object (the benches print theirs last)."""
    for candidate in [text, *reversed(text.strip().splitlines())]:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _run(argv: list[str], limit_s: int) -> dict:
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", f"{exc.stderr or ''}\ntimed out after {limit_s} s"
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    return {
        "command": " ".join(argv),
        "rc": rc,
        "seconds": round(time.monotonic() - start, 1),
        "result": _json_result(out),
        "output_tail": (out + err)[-4000:],
    }


def gpu_check(python: str, tests: Path) -> dict:
    """Every part's command, exit code, seconds, parsed JSON result and output tail."""
    eossl = [python, "-m", "eossl.launch"]
    parts: dict[str, dict] = {"doctor": _run([*eossl, "doctor", "--json"], LIMITS["doctor"])}
    pytest = [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)]
    # The test suite's fixtures (tests/conftest.py) write GeoTIFFs: without rasterio nothing collects.
    no_tests = f"no tests folder {tests}" if not tests.is_dir() else missing("rasterio")
    parts["pytest_gpu"] = {"skipped": no_tests} if no_tests else _run(pytest, LIMITS["pytest_gpu"])
    dali = missing("nvidia.dali")
    benches = {"bench_train": ["train", "--steps", "30"], "bench_loader": ["loader"]}
    for name, args in benches.items():
        parts[name] = {"skipped": dali} if dali else _run([*eossl, "bench", *args, "--json"], LIMITS[name])
    ran = [p for p in parts.values() if "rc" in p]
    return {"ok": all(p["rc"] == 0 for p in ran), "python": python, "parts": parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eossl.launch.doctor.gpu_check", description=__doc__)
    p.add_argument("--out", default="gpu-check.json", help="the JSON file written (default: gpu-check.json)")
    p.add_argument("--tests", default="tests", help="the test folder pytest -m gpu runs (default: tests)")
    args = p.parse_args(argv)
    result = gpu_check(sys.executable, Path(args.tests))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, part in result["parts"].items():
        state = (
            f"skipped: {part['skipped']}" if "skipped" in part else f"rc {part['rc']} in {part['seconds']} s"
        )
        print(f"{name:<13} {state}")
    print(f"{'ok' if result['ok'] else 'FAILED'}: {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
