"""Logprob closeness of autodeploy to HF transformers eager on the same weights (issue: GPU correctness).

Usage:
  python benchmarks/gpu_correctness.py [MODEL] [--json out.json]           # real weights (default: SmolLM2)
  python benchmarks/gpu_correctness.py benchmarks/llama-3.1-8b --config-only  # random weights, 8B shape
  ... [--dtype bfloat16] [--prompts 8] [--new-tokens 64] [--top-k 5] [--device auto] [-o key=value ...]

Both sides run the same weights: with --config-only the HF model is built from config.json with a
seeded random init and saved as safetensors to a temporary folder that autodeploy then loads.
Both greedy-decode every prompt for --new-tokens tokens (EOS ignored), and each side's sequence is
judged by the other: wherever a side's greedy token differs from the other's argmax on the same
context, it must be in the other's top-k. That rule, at every position of both sequences (each
teacher-forced through the judge), is the pass/fail. Also reported: the narrower reading, only where
the two greedy decodes first part (the one position where both sides chose from the same context
without teacher forcing), |logprob| differences of the chosen tokens and the flatness of the
distributions.

Which path produces which numbers:
  - our tokens: `LLM.generate` over all prompts at once (paged-KV runtime; decode steps replay CUDA
    graphs on CUDA), so the real decode path chose them;
  - our logprobs of our own tokens: the runtime's decode path (`SamplingParams(logprobs=0)`); our
    full distributions (to judge HF's tokens, and our own decode path) come from `OptimizedModel.logits`
    (the executor's `full_logits`: each sequence teacher-forced as one prefill through the cached
    graph, i.e. the prefill kernels);
  - HF tokens: eager greedy with HF's own KV cache, as `generate` decodes (EOS ignored);
  - HF logprobs: one eager forward over prompt + tokens.
Each side's tokens are also judged by its own logprobs (decode path vs one forward): HF against
itself is the noise floor of the rule at this precision, which matters where random weights make
the distributions nearly flat (std-0.02 init: logits of std ~0.02 * sqrt(hidden)).
Exit status 1 when the top-k rule fails in a cross check.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from autodeploy.bench.hf import build_hf_model
from autodeploy.llm import LLM, SamplingParams, chat_prompt_ids
from autodeploy.loading import ModelSource, load_tokenizer_or_none, resolve_device, resolve_model
from autodeploy.optimizer import OptimizedModel, optimize_model
from autodeploy.recipe import load_recipe

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "Write a Python function that reverses a string.",
    "What is 17 times 23? Show your work.",
    "Summarize the plot of Romeo and Juliet.",
    "List the planets of the solar system in order.",
]

KV_SIZE_KEYS = ("transforms.insert_kv_cache.num_blocks=", "transforms.insert_kv_cache.free_memory_fraction=")
Logits = Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, s] -> logits [1, s, vocab]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="HF folder or hub id (default: the embedded SmolLM2)")
    p.add_argument("--config-only", action="store_true", help="random weights from the folder's config.json")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="random init and random prompt ids")
    p.add_argument("--workdir", default=None, help="where the --config-only checkpoint is saved (default: $TMPDIR)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for our side (repeatable), e.g. transforms.match_rope.enabled=false")
    return p.parse_args(argv)


def make_prompts(source: ModelSource, count: int, seed: int, random_ids: bool,
                 max_len: int) -> tuple[list[list[int]], str]:
    """Chat prompts through the model's tokenizer, or seeded random ids (config-only: no tokenizer, and
    random weights make text meaningless anyway)."""
    tokenizer = None if random_ids else load_tokenizer_or_none(source)
    if tokenizer is not None:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
        if getattr(tokenizer, "chat_template", None):
            return [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions], "chat"
        return [list(tokenizer(q)["input_ids"]) for q in questions], "text"
    rng = random.Random(seed)
    vocab = source.config.get_text_config().vocab_size
    lens = [rng.randint(min(32, max_len), max_len) for _ in range(count)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens], "random ids"


def gen_logprobs(logits: Logits, prompt: list[int], tokens: list[int], device: torch.device) -> torch.Tensor:
    """float32 log-softmax [len(tokens), vocab] at the positions that predict `tokens` (teacher-forced)."""
    ids = torch.tensor([prompt + tokens], device=device)
    with torch.inference_mode():
        out = logits(ids)[0, len(prompt) - 1:len(prompt) + len(tokens) - 1]
        return torch.log_softmax(out.float(), dim=-1)


def picked(logprobs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """logprobs [n, vocab] at each position's token [n]."""
    return logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0]


@dataclass
class Judged:
    """One side's greedy tokens judged by the other side's distribution on the same contexts."""

    positions: int = 0
    argmax_mismatches: int = 0
    ranks: list[int] = field(default_factory=list)  # rank of each chosen token in the judge's distribution
    abs_logprob_diffs: list[float] = field(default_factory=list)  # |producer - judge| logprob of the token
    failures: list[dict] = field(default_factory=list)  # chosen tokens outside the judge's top-k

    def add(self, prompt: int, tokens: list[int], producer: torch.Tensor, judge: torch.Tensor, top_k: int) -> None:
        """producer: the producing side's logprob of each chosen token [n]; judge: the judge's [n, vocab]."""
        chosen = picked(judge, tokens)
        ranks = (judge > chosen[:, None]).sum(dim=1).tolist()
        self.positions += len(tokens)
        self.argmax_mismatches += sum(r > 0 for r in ranks)
        self.ranks += ranks
        self.abs_logprob_diffs += (producer.to(chosen.device) - chosen).abs().tolist()
        self.failures += [{"prompt": prompt, "step": s, "token": tokens[s], "rank": r}
                          for s, r in enumerate(ranks) if r >= top_k]

    def summary(self) -> dict:
        diffs = self.abs_logprob_diffs
        return {"positions": self.positions, "argmax_mismatches": self.argmax_mismatches,
                "top_k_failures": len(self.failures), "max_rank": max(self.ranks, default=0),
                "max_abs_logprob_diff": max(diffs, default=0.0),
                "mean_abs_logprob_diff": sum(diffs) / max(len(diffs), 1), "failures": self.failures[:20]}


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """HF eager greedy with its own KV cache, as `generate` decodes (EOS ignored): HF's decode path.
    Returns the tokens and the float32 log-softmax [new_tokens, vocab] each was picked from."""
    out = hf(torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    logprobs = []
    for step in range(new_tokens):
        logprobs.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
        tokens.append(int(logprobs[-1].argmax()))
        if step + 1 < new_tokens:
            out = hf(torch.tensor([tokens[-1:]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return tokens, torch.stack(logprobs)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def at_first_divergence(ours: list[list[int]], hf: list[list[int]], on_ours: "Judged", on_hf: "Judged",
                        new_tokens: int) -> list[dict]:
    """Where each prompt's two greedy decodes first part: the rank of each side's token in the other's
    distribution (the judged ranks are in prompt order, new_tokens per prompt)."""
    out = []
    for i, (a, b) in enumerate(zip(ours, hf)):
        step = first_divergence(a, b)
        if step is not None:
            at = i * new_tokens + step
            out.append({"prompt": i, "step": step, "ours_rank_in_hf": on_ours.ranks[at],
                        "hf_rank_in_ours": on_hf.ranks[at]})
    return out


def flatness(logprobs: list[torch.Tensor]) -> dict:
    """How peaked the reference distributions are: with near-flat ones (random init) argmax and
    top-k agreement are weak evidence and the logprob differences carry the information."""
    lp = torch.cat(logprobs)
    entropy = -(lp.exp() * lp).sum(dim=-1)
    top2 = lp.topk(2, dim=-1).values
    return {"mean_entropy_nats": entropy.mean().item(), "log_vocab": math.log(lp.shape[-1]),
            "median_top1_top2_margin": (top2[:, 0] - top2[:, 1]).median().item()}


def kv_overrides(prompts: list[list[int]], new_tokens: int, overrides: list[str]) -> list[str]:
    """An explicit KV pool for these requests (plus a CUDA-graph scratch block and slack), instead of
    the default share of free memory, which the HF model on the same GPU would distort."""
    if any(o.startswith(KV_SIZE_KEYS) for o in overrides):  # the caller sized it
        return []
    block = load_recipe(None, overrides).transforms["insert_kv_cache"].block_size
    blocks = sum(-(-(len(p) + new_tokens) // block) for p in prompts) + len(prompts) + 1
    return [f"transforms.insert_kv_cache.num_blocks={blocks}"]


def captured_graph_sizes(llm: LLM) -> list[int]:
    """Decode batch sizes captured as CUDA graphs ([] when none, or when the engine hides them: this
    looks inside the runtime, which has no public accessor for it)."""
    graphs = getattr(getattr(getattr(llm, "engine", None), "executor", None), "graphs", None)
    return list(getattr(graphs, "sizes", [])) if graphs is not None else []


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name], clock = now - clock, now

    source = resolve_model(args.model, config_only=args.config_only)
    config = source.config.get_text_config()
    max_prompt = min(128, getattr(config, "max_position_embeddings", 4096) - args.new_tokens)
    prompts, prompt_kind = make_prompts(source, args.prompts, args.seed, args.config_only, max_prompt)
    # Config-only: seeded random init on the device. It stays there next to ours (8B: 2 x 16 GB).
    hf = build_hf_model(source, dtype, device, args.seed)
    lap("build_hf")

    with tempfile.TemporaryDirectory(prefix="gpu-correctness-", dir=args.workdir) as folder:
        if args.config_only:
            hf.save_pretrained(folder)  # ours loads exactly these weights
            lap("save_checkpoint")

        def hf_forward(ids: torch.Tensor) -> torch.Tensor:
            return hf(ids, use_cache=False).logits

        hf_tokens, hf_decode_lps = zip(*(hf_greedy(hf, p, args.new_tokens, device) for p in prompts))
        lap("hf_greedy")

        overrides = [f"model.dtype={args.dtype}", f"model.device={device}", *args.override]
        overrides += kv_overrides(prompts, args.new_tokens, overrides)
        opt: OptimizedModel = optimize_model(folder if args.config_only else source.path, overrides=overrides,
                                             progress=False)
        llm = LLM.from_optimized(opt, max_batch_size=len(prompts))
        lap("optimize")
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
        outs = llm.generate(prompts, params)
        bad = [o for o in outs if len(o.token_ids) != args.new_tokens]
        if bad:
            raise RuntimeError(f"{bad[0].request_id} ended after {len(bad[0].token_ids)} tokens: "
                               f"{bad[0].finish_reason} {bad[0].error or ''}")
        ours_tokens = [[int(t) for t in o.token_ids] for o in outs]  # plain ints whatever the runtime hands
        ours_decode_lps = [torch.tensor([e[t] for t, e in zip(o.token_ids, o.logprobs)]) for o in outs]
        lap("ours_generate")

    # Cross checks (the verdict), and each side's decode-path tokens judged by its own one-forward
    # logprobs: the same rule's noise floor at this precision (HF against itself).
    on_ours, on_hf, ours_self, hf_self, hf_ref = Judged(), Judged(), Judged(), Judged(), []
    for i, prompt in enumerate(prompts):
        ours_lp = gen_logprobs(opt.logits, prompt, ours_tokens[i], device)
        hf_lp = gen_logprobs(hf_forward, prompt, ours_tokens[i], device)
        on_ours.add(i, ours_tokens[i], ours_decode_lps[i], hf_lp, args.top_k)
        ours_self.add(i, ours_tokens[i], ours_decode_lps[i], ours_lp, args.top_k)
        ours_lp = gen_logprobs(opt.logits, prompt, hf_tokens[i], device)
        hf_lp = gen_logprobs(hf_forward, prompt, hf_tokens[i], device)
        on_hf.add(i, hf_tokens[i], picked(hf_lp, hf_tokens[i]), ours_lp, args.top_k)
        hf_self.add(i, hf_tokens[i], picked(hf_decode_lps[i], hf_tokens[i]), hf_lp, args.top_k)
        hf_ref.append(hf_lp)
    lap("logprobs")

    dist = flatness(hf_ref)
    notes = []
    if dist["mean_entropy_nats"] > 0.5 * dist["log_vocab"]:
        notes.append(f"near-flat next-token distributions (mean entropy {dist['mean_entropy_nats']:.2f} of "
                     f"log V {dist['log_vocab']:.2f} nats; initializer_range "
                     f"{getattr(config, 'initializer_range', None)}): top-k agreement is weak evidence here; "
                     "compare the |dlogprob| with HF's own noise floor and the top1-top2 margin")
    if hf_self.failures:
        notes.append(f"HF fails the same top-{args.top_k} rule against itself {len(hf_self.failures)} times "
                     "(its KV-cache decode tokens vs its one-forward logprobs): the rule is at bf16 noise level here")
    failures = len(on_ours.failures) + len(on_hf.failures)
    parting = at_first_divergence(ours_tokens, list(hf_tokens), on_ours, on_hf, args.new_tokens)
    return {
        "model": source.name, "config_only": args.config_only, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "prompts": len(prompts), "prompt_kind": prompt_kind, "prompt_lens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens, "top_k": args.top_k, "seed": args.seed, "overrides": overrides,
        "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "cuda_graph_sizes": captured_graph_sizes(llm),
        "paths": {"ours_tokens": "LLM.generate: paged-KV runtime, prompts batched (decode CUDA graphs on CUDA)",
                  "ours_logprobs": "of our own tokens: the runtime's decode path (SamplingParams(logprobs=0)); "
                                   "judging HF's tokens: OptimizedModel.logits (executor.full_logits), "
                                   "teacher-forced prefill through the cached graph",
                  "hf_tokens": "HF eager greedy with its KV cache (DynamicCache), as generate decodes",
                  "hf_logprobs": "HF eager, one forward over prompt + tokens"},
        "on_ours_sequences": on_ours.summary(),  # our tokens judged by HF
        "on_hf_sequences": on_hf.summary(),  # HF's tokens judged by ours
        "first_divergence_step": [first_divergence(a, b) for a, b in zip(ours_tokens, hf_tokens)],
        "at_first_divergence": parting,  # the narrower reading of the rule
        "first_divergence_passed": all(max(p["ours_rank_in_hf"], p["hf_rank_in_ours"]) < args.top_k
                                       for p in parting),
        "ours_self": ours_self.summary(),  # our decode-path tokens judged by our prefill-path logprobs
        "hf_self": hf_self.summary(),  # HF's KV-cache tokens and logprobs vs its one-forward logprobs
        "hf_distribution": dist, "notes": notes,
        "ours_tokens": ours_tokens, "hf_tokens": list(hf_tokens),
        "seconds": seconds,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "passed": failures == 0,
    }


def describe(r: dict) -> str:
    def side(name: str, s: dict, judge: str, tail: str = "") -> str:
        tail = tail or f"|dlogprob| max {s['max_abs_logprob_diff']:.3g} mean {s['mean_abs_logprob_diff']:.3g}"
        return (f"  {name}: {s['positions']} positions, {s['argmax_mismatches']} argmax mismatches, "
                f"{s['top_k_failures']} outside {judge} top-{r['top_k']} (max rank {s['max_rank']}), {tail}")

    d = r["hf_distribution"]
    lines = [
        f"{r['model']} ({'random weights' if r['config_only'] else 'checkpoint'}) {r['dtype']} on {r['device_name']}: "
        f"{r['prompts']} prompts ({r['prompt_kind']}, {min(r['prompt_lens'])}-{max(r['prompt_lens'])} tokens) "
        f"x {r['new_tokens']} new tokens; CUDA graphs {r['cuda_graph_sizes'] or 'none'}",
        side("our tokens, judged by HF  ", r["on_ours_sequences"], "HF"),
        side("HF tokens, judged by ours ", r["on_hf_sequences"], "our"),
        "  first divergence step per prompt: "
        + " ".join("-" if s is None else str(s) for s in r["first_divergence_step"]),
        "  there, rank of our token in HF's / of HF's in ours: "
        + (" ".join(f"{p['ours_rank_in_hf']}/{p['hf_rank_in_ours']}" for p in r["at_first_divergence"]) or "-")
        + f"  ({'within' if r['first_divergence_passed'] else 'NOT within'} top-{r['top_k']})",
        side("our tokens, judged by ours", r["ours_self"], "our",
             f"|dlogprob| max {r['ours_self']['max_abs_logprob_diff']:.3g} mean "
             f"{r['ours_self']['mean_abs_logprob_diff']:.3g} (our decode vs prefill path)"),
        side("HF tokens, judged by HF   ", r["hf_self"], "HF") + "  (HF's KV cache vs one forward: noise floor)",
        f"  HF distributions: mean entropy {d['mean_entropy_nats']:.2f} nats (log V {d['log_vocab']:.2f}), "
        f"median top1-top2 margin {d['median_top1_top2_margin']:.3g}",
        *[f"  note: {n}" for n in r["notes"]],
        "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()),
        "PASS" if r["passed"] else "FAIL",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(describe(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
