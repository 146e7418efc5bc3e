"""One check's outcome and the report that collects them: what ``eossl doctor`` prints and exits on.

A check ends in one of four states. Only ``fail`` makes the exit code 1: a GPU check on a login node is
``not applicable`` and a check whose package is not installed (DALI, MLflow, boto3 on a bare GPU image) is
``not available``, so the same command passes on every machine that can do what it is asked to do.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FAIL", "NOT_APPLICABLE", "NOT_AVAILABLE", "PASS", "Check", "Report", "missing", "run_check"]

PASS, FAIL, NOT_APPLICABLE, NOT_AVAILABLE = "pass", "fail", "not applicable", "not available"


@dataclass
class Check:
    """A check's name, state, one-line reason and measured values (versions, samples/s, bytes free)."""

    name: str
    status: str
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)


class Report:
    """The checks of one doctor run, in the order they ran."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAIL]

    def as_dict(self) -> dict:
        return {"ok": not self.failed, "failed": self.failed, "checks": [asdict(c) for c in self.checks]}

    def text(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"{c.name:<{width}}  {c.status:<14}  {c.detail}".rstrip() for c in self.checks]
        verdict = "all applicable checks passed" if not self.failed else f"FAILED: {', '.join(self.failed)}"
        return "\n".join([*lines, verdict])


def missing(module: str) -> str | None:
    """None when ``module`` imports, else why not (a blocked or absent package is 'not available')."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:  # also a module set to None in sys.modules
        return f"{module} not importable ({exc})"
    return None


def run_check(report: Report, name: str, fn: Callable[[], Check | None]) -> Check:
    """Run one check; an exception is that check's failure (with its message), never the doctor's."""
    try:
        check = fn()
    except Exception as exc:  # noqa: BLE001  (any error is the check's finding)
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
        check = Check(name, FAIL, f"{type(exc).__name__}: {exc}{where}"[:500])
    return report.add(check if check.name else Check(name, check.status, check.detail, check.values))
