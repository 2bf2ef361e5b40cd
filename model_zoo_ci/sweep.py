"""The wide-net sweep: every text causal-LM type the installed transformers registers, from a tiny
config derived from its config class, through the default pipeline against HF eager.

Which types: MODEL_FOR_CAUSAL_LM_MAPPING minus, by rule, encoder-decoders (`is_encoder_decoder`),
encoders that also serve as decoders (types with a masked-LM head), and multimodal composites (a
text config nested in another, or a vision/audio sub-config). The tiny config starts from the
class's defaults (the architecture's real layout: norms, activations, rope, layer patterns) and
shrinks sizes by field name: hidden 64, 4 heads of 16, vocab 512, 4 experts with 2 active, and the
fewest layers that show every kind of a per-layer pattern (at least 2). A type that transformers
itself cannot build or run from that config is listed as such and not counted.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .runner import EntryResult, first_line, run_entry
from .zoo import ZOO_FILE, ZooEntry, load_zoo

_HIDDEN, _HEADS, _HEAD_DIM, _VOCAB, _EXPERTS = 64, 4, 16, 512, 4
# field name -> tiny value; only fields the config class has (after its attribute_map) are set
_SIZES = {
    "hidden_size": _HIDDEN, "intermediate_size": 128, "num_attention_heads": _HEADS, "head_dim": _HEAD_DIM,
    "d_head": _HEAD_DIM, "vocab_size": _VOCAB,
    "num_experts": _EXPERTS, "num_local_experts": _EXPERTS, "n_routed_experts": _EXPERTS, "moe_num_experts": _EXPERTS,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16, "mamba_n_heads": 8, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_d_ssm": 128, "mamba_n_groups": 1, "n_groups": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
}
_AT_MOST = {"num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k": 2}
_ROTARY_DIM = 8  # `rotary_dim` (GPT-J, CodeGen): a partial rotary part of the 16-wide heads
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}
_MODALITY_KEYS = ("vision", "audio", "speech", "image", "video")
SWEEP_TOLERANCE = 1e-3  # max |logit diff| / max |logit|; the pass criterion is equal greedy tokens


@dataclass
class SweepResult:
    model_type: str
    hf_unsupported: str = ""  # why transformers itself cannot build or run the tiny config; "" if it can
    entry: EntryResult | None = None
    seconds: float = 0.0


@dataclass
class SweepSelection:
    types: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # model type -> the rule that excludes it


def select_types() -> SweepSelection:
    """The text causal-LM types of the installed transformers, and the excluded ones with their rule."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto

    masked_lm = set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    selection = SweepSelection()
    for model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_cls = CONFIG_MAPPING[model_type]
        sub_configs = getattr(config_cls, "sub_configs", None) or {}
        if _default(config_cls, "is_encoder_decoder"):
            selection.excluded[model_type] = "encoder-decoder"
        elif model_type in masked_lm:
            selection.excluded[model_type] = "encoder (has a masked-LM head)"
        elif "text_config" in sub_configs or any(k in name for name in sub_configs for k in _MODALITY_KEYS):
            selection.excluded[model_type] = "multimodal (composite config)"
        else:
            selection.types.append(model_type)
    return selection


def _default(config_cls, name: str):
    """A field of the class's default config (None when the defaults do not even build)."""
    try:
        return getattr(config_cls(), name, None)
    except Exception:
        return None


def _is_pattern(value, layers: int) -> bool:
    """A per-layer pattern: one kind (a string, e.g. 'full_attention' or 'M') per layer."""
    return isinstance(value, (list, str)) and len(value) == layers and all(isinstance(v, str) for v in value)


def _is_layer_index_list(value, layers: int) -> bool:
    """A list of layer indices (e.g. which layers attend)."""
    return (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and max(value) < layers and value == sorted(set(value)))


def _layer_count(fields: dict, layers: int) -> int:
    """The fewest layers (>= 2) whose prefix of every per-layer pattern holds all of its kinds."""
    wanted = 2
    for value in fields.values():
        if _is_pattern(value, layers) and layers > 2:
            kinds = set(value)
            seen: set = set()
            for i, kind in enumerate(value):
                seen.add(kind)
                if seen == kinds:
                    wanted = max(wanted, i + 1)
                    break
    return min(wanted, layers)


def _derived_sizes(config, fields: dict, put: Callable) -> None:
    """Sizes the defaults leave unset (None: 'derive it') or tie to others, made consistent with the tiny ones;
    without this HF cannot build or run the tiny config and the type would wrongly count as unsupported."""
    for name, value in (("head_dim", _HEAD_DIM), ("num_key_value_heads", _HEADS)):
        if hasattr(config, name) and getattr(config, name) is None:
            put(name, value)
    if hasattr(config, "num_experts_per_tok") and config.num_experts_per_tok is None and any(
            getattr(config, n, None) for n in _EXPERT_COUNTS):
        put("num_experts_per_tok", _AT_MOST["num_experts_per_tok"])
    for name in list(fields):  # e.g. unpadded_vocab_size (the LM head's rows): never past the tiny vocab
        value = fields[name]
        if name.endswith("vocab_size") and isinstance(value, int) and not isinstance(value, bool) and value > _VOCAB:
            put(name, _VOCAB)
    if isinstance(getattr(config, "rotary_dim", None), int):
        put("rotary_dim", _ROTARY_DIM)
    if getattr(config, "qk_rope_head_dim", None) is not None:  # MLA: rope applies to the rope part of q/k only
        put("head_dim", _SIZES["qk_rope_head_dim"])
        if hasattr(config, "qk_head_dim"):
            put("qk_head_dim", _SIZES["qk_nope_head_dim"] + _SIZES["qk_rope_head_dim"])
    expand, ssm_heads = getattr(config, "expand", None), getattr(config, "num_heads", None)
    if isinstance(expand, int) and isinstance(ssm_heads, int) and getattr(config, "head_dim", None):
        put("num_heads", _HIDDEN * expand // _HEAD_DIM)  # Mamba-2: heads * head_dim == hidden * expand


def tiny_config_fields(model_type: str) -> dict:
    """config.json fields of a tiny model of `model_type`, derived from its config class's defaults."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    fields = config.to_dict()
    attribute_map = getattr(config, "attribute_map", {}) or {}
    names = {name: attribute_map.get(name, name) for name in set(fields) | set(attribute_map)}

    def put(name: str, value) -> None:
        for alias, target in names.items():
            if target == name or alias == name:
                if target in fields:
                    fields[target] = value
                elif alias in fields:
                    fields[alias] = value

    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    for name, value in _SIZES.items():
        if getattr(config, name, None) is not None:
            put(name, value)
    for name, value in _AT_MOST.items():
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            put(name, min(current, value))
    if isinstance(kv_heads, int):
        put("num_key_value_heads", _HEADS if kv_heads == heads else 2)
    _derived_sizes(config, fields, put)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int):
        tiny_layers = _layer_count(fields, layers)
        for name, value in list(fields.items()):
            if _is_pattern(value, layers):
                fields[name] = value[:tiny_layers]
            elif _is_layer_index_list(value, layers) and name != "num_hidden_layers":
                fields[name] = [i for i in value if i < tiny_layers]
        put("num_hidden_layers", tiny_layers)
    for name, value in _SPECIAL_TOKENS.items():  # class defaults may point past the tiny vocab
        if fields.get(name) is not None:
            fields[name] = value
    for name in ("transformers_version", "architectures", "_name_or_path", "auto_map"):
        fields.pop(name, None)
    fields["model_type"] = model_type
    return fields


def sweep_entry(model_type: str) -> ZooEntry:
    """A zoo entry for `model_type`'s tiny config, with the zoo's defaults (recipe, prompt, seed)."""
    template = load_zoo(ZOO_FILE)[0]
    entry = ZooEntry(
        name=model_type, hub_id=f"defaults of the {model_type} config class", config=tiny_config_fields(model_type),
        recipe=template.recipe, seed=template.seed, prompt=[t % _VOCAB for t in template.prompt], max_new_tokens=4,
        tolerance=SWEEP_TOLERANCE, attn_implementation="auto", checkpoint_format="hub",
    )
    if entry.config.get("is_decoder") is False and _sees_later_tokens(entry):
        entry.config["is_decoder"] = True  # what HF asks of an encoder class used as a causal LM (BertGeneration)
    return entry


def _sees_later_tokens(entry: ZooEntry) -> bool:
    """Whether HF's model of the tiny config lets a token see later ones (an encoder left bidirectional): its
    logits for the prompt's first tokens change when the last token changes. False when HF cannot run it."""
    try:
        model = _hf_model(entry)
        ids = torch.tensor([entry.prompt])
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % _VOCAB
        with torch.inference_mode():
            first, second = (model(t, use_cache=False).logits[0, :-1] for t in (ids, changed))
        return not torch.allclose(first, second)
    except Exception:
        return False


def _hf_model(entry: ZooEntry) -> torch.nn.Module:
    """transformers' model of the entry's tiny config (random weights, the attention it picks itself)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from autodeploy.loading import hf_attn_implementation

    fields = dict(entry.config)
    config = CONFIG_MAPPING[fields.pop("model_type")](**fields)
    return AutoModelForCausalLM.from_config(config, attn_implementation=hf_attn_implementation("auto")).eval()


def hf_runs(entry: ZooEntry) -> str:
    """'' when transformers builds the tiny config and runs a forward on the prompt; else why not."""
    try:
        model = _hf_model(entry)
        with torch.inference_mode():
            logits = model(torch.tensor([entry.prompt]), use_cache=False).logits
        if not torch.isfinite(logits).all():
            return "HF's logits are not finite"
    except Exception as e:
        return first_line(e)
    return ""


class SweepTimeout(Exception):
    """A type took longer than the sweep's per-type limit (typically a minutes-long failing export)."""


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise SweepTimeout in this (main) thread after `seconds`; no limit where SIGALRM is unavailable."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SweepTimeout(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _memory_limit(gigabytes: float):
    """Allocations past `gigabytes` more address space than the process holds now fail (MemoryError or torch's
    "can't allocate memory", reported as the type's failure) instead of the kernel killing the whole sweep (blt's
    tiny config took over 18 GB in HF's own forward). No limit for 0, or where RLIMIT_AS is unavailable."""
    try:
        import resource
    except ImportError:
        resource = None
    if gigabytes <= 0 or resource is None or not hasattr(resource, "RLIMIT_AS"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * resource.getpagesize()
    limit = held + int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_sweep(types: list[str], on_result: Callable[[SweepResult], None] | None = None,
              time_limit: int = 0, memory_limit: float = 0) -> list[SweepResult]:
    """Every type in order: HF's own check first, then the zoo runner (never raises for a model problem).
    `time_limit` > 0 bounds each type's seconds; a type over it fails at the stage it was in; `memory_limit` > 0
    bounds the memory (GB) a type may take beyond what the sweep holds."""
    results = []
    for model_type in types:
        start = time.perf_counter()
        result = SweepResult(model_type)
        with _time_limit(time_limit), _memory_limit(memory_limit):  # sweep_entry runs HF's model too
            try:
                entry = sweep_entry(model_type)
            except Exception as e:
                result.hf_unsupported = f"no tiny config: {first_line(e)}"
            else:
                result.hf_unsupported = hf_runs(entry)
                if not result.hf_unsupported:
                    result.entry = run_entry(entry)
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def sweep_markdown(results: list[SweepResult], selection: SweepSelection | None = None) -> str:
    """The report: pass rate over the types HF can run, each one's stage and first error line."""
    runnable = [r for r in results if r.entry is not None]
    passed = [r for r in runnable if r.entry.passed]
    lines = [f"{len(passed)}/{len(runnable)} text causal-LM types pass "
             f"({100 * len(passed) / max(len(runnable), 1):.0f} %; tokens equal to HF eager, float32 CPU); "
             f"{len(results) - len(runnable)} types HF itself cannot build or run from the tiny config", "",
             "| type | architecture | result | stage | first error line |", "|---|---|---|---|---|"]
    for r in runnable:
        failure = r.entry.first_failure()
        stage, detail = (failure[0], failure[1].detail.replace("|", "\\|")) if failure else ("", "")
        verdict = "pass" if r.entry.passed else "FAIL"
        lines.append(f"| {r.model_type} | {r.entry.architecture or '-'} | {verdict} | {stage} | {detail[:160]} |")
    unsupported = [r for r in results if r.entry is None]
    if unsupported:
        lines += ["", "## HF itself cannot build or run the tiny config (not counted)", ""]
        lines += [f"- **{r.model_type}**: {r.hf_unsupported[:200]}" for r in unsupported]
    if selection is not None and selection.excluded:
        lines += ["", "## Excluded by rule", ""]
        lines += [f"- {rule}: {', '.join(t for t, why in selection.excluded.items() if why == rule)}"
                  for rule in sorted(set(selection.excluded.values()))]
    return "\n".join(lines) + "\n"
