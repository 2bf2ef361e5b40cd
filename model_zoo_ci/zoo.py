"""The zoo definition: zoo.yaml's entries with the defaults merged in, and subset selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

ZOO_FILE = Path(__file__).with_name("zoo.yaml")
CHECKPOINT_FORMATS = ("hub", "native")


@dataclass
class ZooEntry:
    name: str
    hub_id: str
    config: dict  # config.json fields, model_type included
    recipe: Path
    seed: int
    prompt: list[int]
    max_new_tokens: int
    tolerance: float  # max |logit diff| / max |HF logit|
    attn_implementation: str
    checkpoint_format: str
    expect: dict[str, dict[str, int]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    ci: bool = False
    note: str = ""
    quantization: dict = field(default_factory=dict)  # {algo, group_size} online, or {checkpoint: gptq, group_size}
    top_k: int = 0  # > 0: greedy tokens may part where, at the first divergence, each side's token is in the other's top-k


def load_zoo(path: Path = ZOO_FILE) -> list[ZooEntry]:
    """Every entry of the zoo file, defaults applied (an entry's `config` is merged over the default one)."""
    raw = yaml.safe_load(Path(path).read_text())
    defaults = dict(raw.get("defaults") or {})
    base_config = defaults.pop("config", {})
    entries = []
    for item in raw["entries"]:
        merged = {**defaults, **item, "config": {**base_config, **item["config"]}}
        merged["recipe"] = Path(path).parent / merged["recipe"]
        if merged["checkpoint_format"] not in CHECKPOINT_FORMATS:
            raise ValueError(f"{item['name']}: checkpoint_format must be one of {CHECKPOINT_FORMATS}")
        entries.append(ZooEntry(**merged))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate zoo entries: {', '.join(duplicates)}")
    return entries


def select(entries: list[ZooEntry], subset: str | None = None, only: list[str] | None = None) -> list[ZooEntry]:
    """`subset='ci'` keeps the fast subset; `only` keeps the named entries (unknown names are an error)."""
    if only:
        known = {e.name for e in entries}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown zoo entries: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        entries = [e for e in entries if e.name in only]
    if subset == "ci":
        entries = [e for e in entries if e.ci]
    elif subset not in (None, "all"):
        raise ValueError(f"unknown subset {subset!r} (ci or all)")
    return entries
