"""Zoo results as Markdown (for humans and the README), JSON (for tools) and a small HTML table."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from .runner import FAILED, MISMATCH, NOT_APPLICABLE, OK, SKIPPED, STAGES, EntryResult

_MARK = {OK: "ok", FAILED: "FAIL", MISMATCH: "MISMATCH", SKIPPED: "-", NOT_APPLICABLE: "n/a"}
_HEADER = ["model", "architecture", *STAGES, "tokens equal", "max rel logit diff", "seconds"]


def _row(r: EntryResult) -> list[str]:
    tokens = {True: "yes", False: "no", None: "-"}[r.tokens_equal]
    diff = f"{r.max_rel_logit_diff:.1e}" if r.max_rel_logit_diff is not None else "-"
    return [r.name, r.architecture or "-", *(_MARK[r.stages[s].status] for s in STAGES), tokens, diff, f"{r.seconds:.1f}"]


def summary_line(results: list[EntryResult]) -> str:
    passed = sum(r.passed for r in results)
    return f"{passed}/{len(results)} zoo entries pass ({sum(r.seconds for r in results):.0f} s)"


def to_markdown(results: list[EntryResult]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    lines += ["", summary_line(results)]
    failures = [(r, r.first_failure()) for r in results if not r.passed]
    if failures:
        lines += ["", "## What fails", ""]
        for r, (stage, detail) in failures:
            lines.append(f"- **{r.name}** ({r.hub_id}) at {stage}: {detail.detail}")
    notes = [r for r in results if r.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{r.name}**: {r.note}" for r in notes]
    return "\n".join(lines) + "\n"


def to_html(results: list[EntryResult]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADER)
    rows = []
    for r in results:
        cells = []
        for value, column in zip(_row(r), _HEADER):
            stage = r.stages.get(column)
            title = f' title="{html.escape(stage.detail)}"' if stage is not None and stage.detail else ""
            cls = f' class="{stage.status.replace("/", "")}"' if stage is not None else ""
            cells.append(f"<td{cls}{title}>{html.escape(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    style = ("table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
             ".ok{background:#dfd}.failed{background:#fcc}.mismatch{background:#fed}")
    return (f"<!doctype html><meta charset=utf-8><title>autodeploy model zoo</title><style>{style}</style>"
            f"<p>{html.escape(summary_line(results))}</p><table><tr>{head}</tr>{''.join(rows)}</table>\n")


def to_json(results: list[EntryResult]) -> str:
    return json.dumps([{**dataclasses.asdict(r), "passed": r.passed} for r in results], indent=2)


def write_reports(results: list[EntryResult], folder: str | Path) -> list[Path]:
    """zoo.md, zoo.json and zoo.html in `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, render in (("zoo.md", to_markdown), ("zoo.json", to_json), ("zoo.html", to_html)):
        path = folder / name
        path.write_text(render(results))
        paths.append(path)
    return paths
