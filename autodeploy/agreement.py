"""How closely the optimized graph agrees with HF transformers eager on the same weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .optimizer import OptimizedModel


@dataclass
class Agreement:
    hf_tokens: list[int]
    ours_tokens: list[int]
    max_abs_logit_diff: float
    max_rel_logit_diff: float  # max |diff| / max |HF logit|

    @property
    def tokens_equal(self) -> bool:
        return self.hf_tokens == self.ours_tokens


def load_hf_reference(opt: OptimizedModel):
    """The same checkpoint through plain HF transformers, same dtype and device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        opt.source.path, dtype=opt.ctx.dtype, trust_remote_code=opt.source.trust_remote_code
    )
    return model.to(opt.device).eval()


@torch.inference_mode()
def greedy_tokens(forward, prompt: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no KV cache needed)."""
    ids = prompt.clone()
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(forward(ids)[0, -1].argmax())
        out.append(nxt)
        if nxt in eos_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return out


def eos_token_ids(hf_model) -> set[int]:
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def runtime_greedy_tokens(opt: OptimizedModel, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy tokens from the in-flight runtime (paged KV cache), cut after the first EOS."""
    from .llm import LLM
    from .runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    tokens = LLM.from_optimized(opt).generate([list(prompt_ids)], params)[0].token_ids
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def compare(opt: OptimizedModel, hf_model, prompt_ids: list[int], max_new_tokens: int) -> Agreement:
    """Greedy continuation from both (ours through the runtime when the graph has a KV cache);
    logits of both over HF's full sequence."""
    from .runtime.kv_cache import kv_cache_of

    prompt = torch.tensor([prompt_ids], device=opt.device)
    eos = eos_token_ids(hf_model)
    hf_tokens = greedy_tokens(lambda ids: hf_model(ids, use_cache=False).logits, prompt, max_new_tokens, eos)
    if kv_cache_of(opt.gm) is not None:
        ours_tokens = runtime_greedy_tokens(opt, prompt_ids, max_new_tokens, eos)
    else:
        ours_tokens = greedy_tokens(opt.logits, prompt, max_new_tokens, eos)
    full = torch.tensor([prompt_ids + hf_tokens], device=opt.device)
    ref = hf_model(full, use_cache=False).logits.float()
    diff = (opt.logits(full).float() - ref).abs().max().item()
    return Agreement(hf_tokens, ours_tokens, diff, diff / max(ref.abs().max().item(), 1e-12))
