"""A zoo entry run sharded: `autodeploy zoo --tensor-parallel-size N`.

The entry's checkpoint goes through `LLM(folder, tensor_parallel_size=N)`: rank 0 optimizes its
shard (its transform reports fill the stages, as for one rank) and drives N - 1 worker processes;
greedy tokens come from the runtime and the logits over HF's sequence from every rank together,
both compared with HF eager as unsharded entries are. An entry whose head counts do not split
over N ranks is skipped with the reason (the sizes that work), not failed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .runner import FAILED, EntryResult, StageResult, _record_transforms, first_line, judge, record_failure
from .zoo import ZooEntry


def skip_reason(entry: ZooEntry, world: int) -> str:
    """Why `entry` cannot run over `world` ranks ('' when it can)."""
    from transformers import CONFIG_MAPPING

    from autodeploy.errors import ShardingError
    from autodeploy.parallel.settings import check_head_counts, head_counts

    fields = dict(entry.config)
    heads = head_counts(CONFIG_MAPPING[fields.pop("model_type")](**fields).get_text_config())
    try:
        if heads is not None:
            check_head_counts(*heads, world)
    except ShardingError as e:
        return str(e)
    return ""


def run_sharded(entry: ZooEntry, folder: str | Path, overrides: list[str], world: int, hf_model,
                result: EntryResult) -> None:
    """Optimize and generate over `world` ranks, filling `result`'s stages; never raises."""
    from autodeploy.agreement import Agreement, eos_token_ids, greedy_tokens
    from autodeploy.llm import LLM, SamplingParams

    stage_start = time.perf_counter()
    try:
        llm = LLM(folder, str(entry.recipe), overrides=overrides, tensor_parallel_size=world)
    except Exception as e:
        record_failure(result, e, stage_start)
        return
    try:
        _record_transforms(llm.model, entry, result)
        stage_start = time.perf_counter()
        with torch.inference_mode():
            prompt = list(entry.prompt)
            eos = eos_token_ids(hf_model)
            hf_tokens = greedy_tokens(lambda ids: hf_model(ids, use_cache=False).logits, torch.tensor([prompt]),
                                      entry.max_new_tokens, eos)
            params = SamplingParams(max_tokens=entry.max_new_tokens, temperature=0.0, ignore_eos=True)
            ours = llm.generate([prompt], params)[0].token_ids
            ours = next((ours[:i + 1] for i, t in enumerate(ours) if t in eos), ours)
            logits = lambda ids: llm.engine.executor.full_logits(ids, torch.arange(ids.shape[1])[None])  # noqa: E731
            full = torch.tensor([prompt + hf_tokens])
            ref = hf_model(full, use_cache=False).logits.float()
            diff = (logits(full).float() - ref).abs().max().item()
            agreement = Agreement(hf_tokens, ours, diff, diff / max(ref.abs().max().item(), 1e-12))
            result.stages["generate"] = judge(agreement, logits, hf_model, entry, result, llm.model.ctx.dtype)
    except Exception as e:
        result.stages["generate"] = StageResult(FAILED, first_line(e))
    finally:
        result.stages["generate"].seconds = time.perf_counter() - stage_start
        llm.shutdown()
