"""HF's `base_model_tp_plan` as a cross-check of the sharding found in the graph (never its source).

Where a config carries a plan (module-path globs -> styles such as colwise, rowwise,
colwise_gather_output, packed_colwise), each linear it names is compared with what the sharding
transform decided: column-parallel, row-parallel, or replicated. Disagreements are reported so a
plan the graph analysis missed (or a stale HF plan) is visible; entries for non-linears (norms,
experts as one op) are not compared.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def _style(style: str) -> str | None:
    """colwise / rowwise for the plan styles that split a linear, None for the others."""
    for kind in ("colwise", "rowwise"):
        if kind in style:
            return kind
    return None


def compare_with_plan(plan: dict[str, str] | None, linears: list[str], ours: dict[str, str]) -> tuple[int, list[str]]:
    """(linears that agree, 'path: HF style, ours ...' for each that does not); `ours` lacks replicated ones."""
    agree, disagree = 0, []
    for path in dict.fromkeys(linears):
        style = next((s for pattern, s in (plan or {}).items()
                      if fnmatchcase(path, pattern) or fnmatchcase(path, "*." + pattern)), None)
        if style is None or _style(style) is None:
            continue
        found = ours.get(path, "replicated")
        if found == _style(style):
            agree += 1
        else:
            disagree.append(f"{path}: HF {style}, ours {found}")
    return agree, disagree
