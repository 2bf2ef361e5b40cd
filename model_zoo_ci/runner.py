"""Run zoo entries through the real pipeline and compare each with HF transformers on the same weights.

Per entry: build the HF model from the tiny config (float32, seeded) and save it as a checkpoint;
`optimize_model` on that folder (export, pattern transforms, load_weights, ...); then logits and a
short greedy generation against the HF model. Each stage is caught on its own, so one broken
architecture shows up as a row with a failed stage instead of stopping the run.
"""

from __future__ import annotations

import gc
import inspect
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .quantized import prepare as prepare_quantized
from .zoo import ZooEntry

# Report columns, in pipeline order. Transform stages fold into them: everything before weight
# loading is "patterns", weight loading is "load", the fusion stage "fusion", everything after it "cache".
STAGES = ("build", "export", "patterns", "load", "fusion", "cache", "generate")
HALF_PRECISION_TOLERANCE = 3e-2  # max |logit diff| / max |HF logit| for bf16 / fp16 runs against HF float32
_TRANSFORM_COLUMN = {
    "pattern": "patterns", "sharding": "patterns", "quantization": "patterns",
    "weight_loading": "load", "fusion": "fusion", "cache": "cache", "compile": "cache",
}
OK, FAILED, MISMATCH, SKIPPED, NOT_APPLICABLE = "ok", "failed", "mismatch", "skipped", "n/a"


@dataclass
class StageResult:
    status: str = SKIPPED
    detail: str = ""  # first error line, or what did not match
    seconds: float = 0.0


@dataclass
class EntryResult:
    name: str
    hub_id: str
    ci: bool
    note: str = ""
    architecture: str = ""
    stages: dict[str, StageResult] = field(default_factory=lambda: {s: StageResult() for s in STAGES})
    matched: dict[str, dict[str, int]] = field(default_factory=dict)  # transform -> kind -> count
    expected: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tokens_equal: bool | None = None
    hf_tokens: list[int] = field(default_factory=list)
    ours_tokens: list[int] = field(default_factory=list)
    max_abs_logit_diff: float | None = None
    max_rel_logit_diff: float | None = None
    tolerance: float = 0.0
    seconds: float = 0.0
    skipped: str = ""  # why the entry did not run (e.g. heads that do not split over the ranks): not a failure

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or all(s.status in (OK, NOT_APPLICABLE) for s in self.stages.values())

    def first_failure(self) -> tuple[str, StageResult] | None:
        for name, stage in self.stages.items():
            if stage.status not in (OK, NOT_APPLICABLE, SKIPPED):
                return name, stage
        return None


def first_line(error: BaseException) -> str:
    """The error's first line, and the one after it when the first only introduces it ('...:')."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(error).__name__}: {text}".rstrip(": ")


def failing_stage(error: BaseException) -> str:
    """Which report column an exception out of `optimize_model` belongs to, from its traceback.

    The innermost pipeline frame decides: `run_transforms` knows the transform it was running
    (its local `name`), `export_causal_lm` is export, and model resolution counts as export too.
    """
    from autodeploy.transforms import TRANSFORMS

    stage = "export"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name == "run_transforms" and frame.f_locals.get("name") in TRANSFORMS:
            stage = _TRANSFORM_COLUMN[TRANSFORMS[frame.f_locals["name"]].stage.name.lower()]
    return stage


def record_failure(result: EntryResult, error: BaseException, stage_start: float) -> None:
    """The stage `error` came from failed; the stages before it passed."""
    stage = failing_stage(error)
    for done in STAGES[1:STAGES.index(stage)]:
        result.stages[done].status = OK
    result.stages[stage] = StageResult(FAILED, first_line(error), time.perf_counter() - stage_start)


def build_checkpoint(entry: ZooEntry, folder: Path) -> torch.nn.Module:
    """The seeded float32 HF model for `entry`, saved to `folder` as safetensors; returns the model."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from autodeploy.loading import hf_attn_implementation

    fields = dict(entry.config)
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    torch.manual_seed(entry.seed)
    attn_implementation = hf_attn_implementation(entry.attn_implementation)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32).eval()
    save_kwargs = {}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["save_original_format"] = entry.checkpoint_format == "hub"
    model.save_pretrained(folder, **save_kwargs)
    return model


def _check_expectations(entry: ZooEntry, result: EntryResult) -> StageResult:
    misses = []
    for transform, kinds in entry.expect.items():
        for kind, want in kinds.items():
            got = result.matched.get(transform, {}).get(kind)
            if got != want:
                misses.append(f"{transform}.{kind} {got if got is not None else 'not run'}/{want}")
    return StageResult(MISMATCH if misses else OK, "; ".join(misses))


def _record_transforms(opt, entry: ZooEntry, result: EntryResult) -> None:
    """Stage statuses and seconds from the transform reports of a successful optimize run."""
    from autodeploy.transforms import TRANSFORMS

    result.stages["export"] = StageResult(OK, seconds=opt.seconds.get("load", 0.0) + opt.seconds.get("export", 0.0))
    columns_run = set()
    for report in opt.reports:
        column = _TRANSFORM_COLUMN[TRANSFORMS[report.name].stage.name.lower()]
        columns_run.add(column)
        result.stages[column].status = OK
        result.stages[column].seconds += report.seconds
        if report.enabled:
            result.matched[report.name] = dict(report.matched)
        result.warnings.extend(report.warnings)
    patterns = _check_expectations(entry, result)
    patterns.seconds = result.stages["patterns"].seconds
    result.stages["patterns"] = patterns
    for column, stage in (("fusion", "fusion"), ("cache", "cache")):
        if column not in columns_run:
            result.stages[column] = StageResult(NOT_APPLICABLE, f"the recipe has no {stage} stage")
    if result.stages["cache"].status == OK and not _has_cache(result.matched):
        result.stages["cache"] = StageResult(MISMATCH, "no KV or state cache (attention matched "
                                             f"{result.matched.get('match_attention', {}).get('attention', 0)}): "
                                             "every step recomputes the whole sequence", result.stages["cache"].seconds)


def _has_cache(matched: dict[str, dict[str, int]]) -> bool:
    """Whether the cache stage gave the model a paged KV cache or state slots (a model with neither still
    generates, by recomputing its whole sequence each step: right tokens, none of the speed)."""
    return (matched.get("insert_kv_cache", {}).get("cached_attention", 0) > 0
            or matched.get("insert_state_cache", {}).get("state_cache", 0) > 0)


def _compare(opt, hf_model, entry: ZooEntry, result: EntryResult) -> StageResult:
    from autodeploy.agreement import compare

    agreement = compare(opt, hf_model, list(entry.prompt), entry.max_new_tokens)
    return judge(agreement, opt.logits, hf_model, entry, result, opt.ctx.dtype)


def logit_tolerance(entry: ZooEntry, dtype: torch.dtype) -> float:
    """The entry's bound, set for float32 runs, widened to HALF_PRECISION_TOLERANCE when the model runs in a
    16-bit float against HF's float32 (the GPU's dtype: `autodeploy zoo model.dtype=bfloat16`)."""
    return entry.tolerance if dtype.itemsize >= 4 else max(entry.tolerance, HALF_PRECISION_TOLERANCE)


def judge(agreement, logits, hf_model, entry: ZooEntry, result: EntryResult, dtype: torch.dtype) -> StageResult:
    """Record `agreement` on `result`; mismatch when tokens part (outside the entry's top-k rule) or
    the logits differ by more than the tolerance for `dtype`. `logits(ids)` is our model's, for the top-k rule."""
    result.tolerance = logit_tolerance(entry, dtype)
    result.hf_tokens, result.ours_tokens = agreement.hf_tokens, agreement.ours_tokens
    result.tokens_equal = agreement.tokens_equal
    result.max_abs_logit_diff = agreement.max_abs_logit_diff
    result.max_rel_logit_diff = agreement.max_rel_logit_diff
    problems = []
    if not agreement.tokens_equal and not (entry.top_k and _within_top_k(logits, hf_model, entry, agreement)):
        rule = f" (outside each other's top-{entry.top_k} where they part)" if entry.top_k else ""
        problems.append(f"greedy tokens differ{rule}: HF {agreement.hf_tokens} vs ours {agreement.ours_tokens}")
    if not agreement.max_rel_logit_diff <= result.tolerance:
        problems.append(f"logit diff {agreement.max_rel_logit_diff:.1e} of max logit > {result.tolerance:.0e}")
    return StageResult(MISMATCH if problems else OK, "; ".join(problems))


@torch.inference_mode()
def _within_top_k(logits, hf_model, entry: ZooEntry, agreement) -> bool:
    """Where the greedy sequences first part (same context on both sides), is each side's token among
    the other's top-k? (Quantized entries: near-flat random-weight distributions may swap close logits.)"""
    step = next(i for i, (a, b) in enumerate(zip(agreement.hf_tokens, agreement.ours_tokens)) if a != b)
    context = torch.tensor([list(entry.prompt) + agreement.hf_tokens[:step]])
    ours, ref = logits(context)[0, -1], hf_model(context, use_cache=False).logits[0, -1]
    return (agreement.ours_tokens[step] in ref.topk(entry.top_k).indices.tolist()
            and agreement.hf_tokens[step] in ours.topk(entry.top_k).indices.tolist())


def run_entry(entry: ZooEntry, extra_overrides: list[str] | tuple = (), tensor_parallel_size: int = 1) -> EntryResult:
    """One zoo entry through every stage; never raises for a model problem.

    With tensor_parallel_size > 1 the entry runs sharded (`sharded.py`): an LLM over N ranks."""
    from autodeploy.optimizer import optimize_model

    from .sharded import run_sharded, skip_reason

    result = EntryResult(name=entry.name, hub_id=entry.hub_id, ci=entry.ci, note=entry.note,
                         expected=entry.expect, tolerance=entry.tolerance)
    result.skipped = skip_reason(entry, tensor_parallel_size) if tensor_parallel_size > 1 else ""
    if result.skipped:
        result.note = f"skipped at tensor_parallel_size {tensor_parallel_size}: {result.skipped}"
        return result
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-{entry.name}-") as folder:
        try:
            hf_model = build_checkpoint(entry, Path(folder))
            quantization = prepare_quantized(entry.quantization, hf_model, Path(folder)) if entry.quantization else []
            result.architecture = type(hf_model).__name__
            result.stages["build"] = StageResult(OK, seconds=time.perf_counter() - start)
        except Exception as e:
            result.stages["build"] = StageResult(FAILED, first_line(e), time.perf_counter() - start)
            result.seconds = time.perf_counter() - start
            return result

        overrides = ["model.device=cpu", "model.dtype=float32",
                     f"model.attn_implementation={entry.attn_implementation}", *quantization, *entry.overrides,
                     *extra_overrides]
        if tensor_parallel_size > 1:
            run_sharded(entry, folder, overrides, tensor_parallel_size, hf_model, result)
            result.seconds = time.perf_counter() - start
            return result
        stage_start = time.perf_counter()
        try:
            opt = optimize_model(folder, recipe=str(entry.recipe), overrides=overrides, progress=False)
        except Exception as e:
            record_failure(result, e, stage_start)
            result.seconds = time.perf_counter() - start
            return result
        _record_transforms(opt, entry, result)

        stage_start = time.perf_counter()
        try:
            result.stages["generate"] = _compare(opt, hf_model, entry, result)
        except Exception as e:
            result.stages["generate"] = StageResult(FAILED, first_line(e))
        result.stages["generate"].seconds = time.perf_counter() - stage_start
        del opt, hf_model
    gc.collect()
    result.seconds = time.perf_counter() - start
    return result


def run_zoo(
    entries: list[ZooEntry],
    extra_overrides: list[str] | tuple = (),
    on_result: Callable[[EntryResult], None] | None = None,
    tensor_parallel_size: int = 1,
) -> list[EntryResult]:
    """Run every entry in order; `on_result` sees each result as soon as it is done."""
    results = []
    for entry in entries:
        result = run_entry(entry, extra_overrides, tensor_parallel_size)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
