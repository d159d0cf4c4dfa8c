"""The gate in the forms CI reads: JUnit XML (one test case per check, GitLab's and GitHub's test reporters show
it) and a Markdown step summary (appended to ``$GITHUB_STEP_SUMMARY`` when it is set).

A test case is a check of export.gate.checks (its ``kind`` is the class name: drift, baseline, class) or a variant
that was not built (kind ``build``); a new kind of check (a device budget) is one more kind, in the same
format.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path


def cases(report: dict) -> list[dict]:
    """Every test case: {"classname", "name", "passed", "message", "skipped"}."""
    out = []
    for r in report["variants"]:
        if r["status"] != "ok":  # not built: failed, or skipped (failing only when it was asked for)
            out.append({"classname": "build", "name": r["name"], "passed": r["passed"], "message": r["reason"],
                        "skipped": r["status"] == "skipped" and r["passed"]})
    for c in report.get("checks", []):
        out.append({"classname": c["kind"], "name": c["name"], "passed": c["passed"], "message": c["why"],
                    "skipped": False})
    return out


def junit_xml(report: dict) -> str:
    tests = cases(report)
    suite = ET.Element("testsuite", name="keras-edge-toolkit export gate", tests=str(len(tests)),
                       failures=str(sum(not t["passed"] for t in tests)),
                       skipped=str(sum(t["skipped"] for t in tests)), errors="0")
    for t in tests:
        case = ET.SubElement(suite, "testcase", classname=f"export.{t['classname']}", name=t["name"])
        if t["skipped"]:
            ET.SubElement(case, "skipped", message=t["message"])
        elif not t["passed"]:
            ET.SubElement(case, "failure", message=t["message"]).text = t["message"]
        else:
            ET.SubElement(case, "system-out").text = t["message"]
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def write_junit(report: dict, path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".part")
    tmp.write_text(junit_xml(report))
    os.replace(tmp, p)


def step_summary(report: dict) -> str:
    """Markdown: the verdict first, then the checks that failed, then every check."""
    tests = cases(report)
    failed = [t for t in tests if not t["passed"]]
    verdict = "PASSED" if report["passed"] else f"FAILED ({len(failed)} check(s))"
    lines = [f"## Edge export gate: {verdict}", "",
             f"`{Path(report['model']).name}`: float model {report['float_accuracy'] * 100:.2f}% on "
             f"{report['num_test_images']:,} test images" + (f"; baseline: {report['baseline']}" if report.get("baseline") else "")
             + ".", ""]
    if failed:
        lines += ["**Failed:**", ""] + [f"- `{t['name']}`: {t['message']}" for t in failed] + [""]
    lines += ["| check | kind | verdict | numbers |", "|---|---|---|---|"]
    for t in tests:
        word = "skipped" if t["skipped"] else "pass" if t["passed"] else "**FAIL**"
        lines.append(f"| {t['name']} | {t['classname']} | {word} | {t['message']} |")
    return "\n".join(lines) + "\n"


def append_step_summary(report: dict) -> None:
    """Append step_summary to $GITHUB_STEP_SUMMARY when GitHub Actions set it."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(step_summary(report))
