"""The export's verdict, decided here and only here: each variant's pass or fail with why, the checks that failed,
and the exit status. The log, report.json, report.md, the JUnit file, the step summary and the model card display
it (export.report, export.gate.ci, export.gate.card); none of them judges again.

A variant passes when it was built and its drift check passed (export.gate.checks, under ``--float-policy``; the
fixed ``--max-drop`` rule by default), or when it was skipped without being named (a variant the user named must be
built). A failed baseline, class or device check fails the export without failing a variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from export.results import VariantResult


@dataclass(frozen=True)
class Decision:
    """One variant's verdict. ``why``: the drift check's numbers for a built variant, else why it was not built."""

    variant: str
    status: str  # the result's: ok, skipped, failed
    passed: bool
    why: str
    line: str  # what the command prints when it fails: "FAIL <variant>: ..." ("" when it passed)


@dataclass(frozen=True)
class Verdict:
    variants: tuple[Decision, ...]  # in report order
    failed_checks: tuple[dict, ...]  # the baseline, class and device checks that failed (export.gate.checks' form)

    @property
    def failed(self) -> list[str]:
        return [d.variant for d in self.variants if not d.passed]

    @property
    def passed(self) -> bool:
        return not self.failed and not self.failed_checks

    @property
    def exit_status(self) -> int:
        """What ``python -m export`` and ``jobs/train.py`` exit with: 0 passed, 1 not."""
        return 0 if self.passed else 1

    @property
    def failures(self) -> list[str]:
        """One line per failure, variants first: what the commands print on stderr."""
        return [d.line for d in self.variants if not d.passed] + \
            [f"FAIL {c['name']}: {c['why']}" for c in self.failed_checks]

    def of(self, variant: str) -> Decision:
        return next(d for d in self.variants if d.variant == variant)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "exit_status": self.exit_status, "failures": self.failures,
                "variants": {d.variant: {"passed": d.passed, "why": d.why} for d in self.variants}}


def decide(results: Sequence[VariantResult], checks: Sequence[dict], config) -> Verdict:
    """The verdict on ``results`` (export.results) given every check (export.gate.checks and export.gate.targets'
    form) and the ExportConfig (``max_drop``, the variants the user named)."""
    drift = {c["variant"]: c for c in checks if c["kind"] == "drift"}
    decisions = []
    for r in results:
        if r.ok:
            c = drift.get(r.name)  # every built variant has one; without (no stored predictions): --max-drop
            passed = c["passed"] if c else r.drop_pp <= config.max_drop
            why = c["why"] if c else (f"drop {r.drop_pp:.2f} pp {'<=' if passed else '>'} "
                                      f"max {config.max_drop} pp")
            line = f"FAIL {r.name}: accuracy {r.measured.accuracy:.4f}, {why}"
        else:  # not built: a skipped variant passes unless the user named it
            passed = r.status == "skipped" and r.name not in config.explicit
            why, line = r.reason, f"FAIL {r.name}: {r.reason}"
        decisions.append(Decision(r.name, r.status, passed, why, "" if passed else line))
    failed_checks = tuple(c for c in checks if not c["passed"] and c["kind"] != "drift")
    return Verdict(tuple(decisions), failed_checks)


def verdict_lines(verdict: Verdict) -> list[str]:
    """The log's account of the verdict: each built variant's pass or FAIL and why, each named variant not built, and
    each failed check (a skipped variant that passes was logged as skipped already)."""
    out = [f"  gate  {d.variant:<14} {'pass' if d.passed else 'FAIL'}: {d.why}" for d in verdict.variants
           if d.status == "ok" or not d.passed]
    return out + [f"  gate  FAIL {c['name']}: {c['why']}" for c in verdict.failed_checks]
