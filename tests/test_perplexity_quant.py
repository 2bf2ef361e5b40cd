"""Online quantization on the real SmolLM2 weights (float32 activations, CPU): perplexity of the fixed text
(tests/data, 4,547 tokens) against the unquantized model, with issue 10's bars, and the default optimize
prompt still answered with Paris.

Bars (relative rise of perplexity): FP8 W8A8 <= 2 %, INT8 weight-only (per channel) <= 1 %, INT4 group 32
<= 10 %, FP8 KV cache <= 2 %. INT4 group 64 and FP8 with per-token activation scales are measured and
printed (run with -s), not held to a bar; INT4 group 128 does not divide SmolLM2's hidden size (576) and
must be refused. The schemes are the defaults: weight scales searched without data
(quantization/scale_search.py; int asymmetric); FP8 activations per token and group of 128 columns (the
last group of a 576-column row holds 64).
Measured here (2026-12-02, window 1024, `pytest -m slow ... -s`): unquantized 42.99; FP8 W8A8 +1.24 %
(per-token activation scales: +2.08 %, over the bar); INT8 per channel +0.23 %; INT4 g32 +0.05 %; INT4 g64
+15.09 %; FP8 KV cache +1.16 %; every scheme answers Paris. Round-to-nearest (`quantization.scale_search=false`)
gave FP8 (per token) +3.75 %, INT8 +0.44 %, INT4 g32 +30.95 % (symmetric), INT4 g64 +54 %. Decomposed in HF
with the same fake-quantized weights: FP8 weights alone +2.74 % (RTN) -> +0.84 % (searched), per-token e4m3
activations alone +0.55 %; of the RTN weight error the last layer's down_proj alone is +1.22 %. With searched
per-channel weights (HF): activations per token +2.06 %, per token and 128 columns +1.12 %, groups only
where 128 divides K (down_proj) +1.61 %, groups of 64 +1.25 %; weight scales per channel and 128-column
block with per-token activations +1.39 %, with both +1.53 %.
Caveat: the embedded SmolLM2 checkpoint's linear weights already lie on a 4-bit affine grid per aligned
group of 32 columns (at most 16 distinct values per group; apparently converted from a GGUF quantization:
its config names "Smollm2 135M 8k Lc100K Mix1 Ep2"), so the least-squares fit recovers them almost
exactly at group 32; group 64 is the representative INT4 figure.
Every scheme costs one optimize, a pass over the text and a short chat (about a minute on one core, the
unquantized reference too), so the whole module is marked slow: `pytest -m slow tests/test_perplexity_quant.py -s`.
"""

from pathlib import Path

import pytest

from autodeploy.cli import DEMO_PROMPT
from autodeploy.eval.perplexity import model_perplexity, text_token_ids

TEXT = Path(__file__).parent / "data" / "shakespeare_coriolanus.txt"
WINDOW = 1024  # 5 windows over the text; the cache below holds one window
COMMON = ["model.dtype=float32", "model.device=cpu", "transforms.insert_kv_cache.num_blocks=40"]
SCHEMES = {  # name -> (overrides, maximum relative rise of perplexity or None = report only)
    "fp8": (["quantization.algo=fp8"], 0.02),
    "int8": (["quantization.algo=int8", "quantization.group_size=-1"], 0.01),
    "int4-g32": (["quantization.algo=int4", "quantization.group_size=32"], 0.10),
    "fp8-kv-cache": (["quantization.kv_cache_dtype=fp8"], 0.02),
    "int4-g64": (["quantization.algo=int4", "quantization.group_size=64"], None),
    "fp8-per-token": (["quantization.algo=fp8", "quantization.act_quant=token"], None),
}
# Group 128 does not divide SmolLM2's hidden size (576): refused with one clear line, before any weight loads.
pytestmark = pytest.mark.slow


def _measure(model_dir, overrides: list[str]):
    """Perplexity of the text and the greedy answer to the demo prompt, through one optimized model."""
    from autodeploy.llm import LLM, SamplingParams
    from autodeploy.optimizer import optimize_model

    opt = optimize_model(model_dir, overrides=COMMON + overrides, progress=False)
    llm = LLM.from_optimized(opt)
    ppl = model_perplexity(opt, text_token_ids(llm.tokenizer, TEXT), window=WINDOW)
    (answer,) = llm.chat([{"role": "user", "content": DEMO_PROMPT}], SamplingParams(max_tokens=16, temperature=0))
    return opt, ppl, answer.text


@pytest.fixture(scope="module")
def unquantized(default_model_dir):
    opt, ppl, answer = _measure(default_model_dir, ["quantization.algo=none"])
    print(f"\n  unquantized: perplexity {ppl.perplexity:.4f} over {ppl.tokens} tokens; answer {answer!r}")
    assert ppl.tokens >= 4000 and "Paris" in answer
    return ppl


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_perplexity_rise(default_model_dir, unquantized, scheme):
    overrides, bar = SCHEMES[scheme]
    opt, ppl, answer = _measure(default_model_dir, overrides)
    rise = ppl.perplexity / unquantized.perplexity - 1
    print(f"\n  {scheme}: perplexity {ppl.perplexity:.4f} ({100 * rise:+.2f} % vs {unquantized.perplexity:.4f}); "
          f"answer {answer!r}")
    counts = {k: v for r in opt.reports if r.name == "quantize_linear" for k, v in r.matched.items()}
    if "algo" in " ".join(overrides):  # the scheme really quantized the model's linears
        assert sum(v for k, v in counts.items() if k.endswith("_linear")) > 0, counts
    if bar is not None:
        assert rise <= bar, f"{scheme}: perplexity rose {100 * rise:.2f} %, the bar is {100 * bar:.0f} %"
    assert "Paris" in answer


def test_int4_group_128_is_refused(default_model_dir):
    from autodeploy.errors import QuantizationError
    from autodeploy.optimizer import optimize_model

    with pytest.raises(QuantizationError, match="group size 128 does not divide in_features 576"):
        optimize_model(default_model_dir, overrides=COMMON + ["quantization.algo=int4", "quantization.group_size=128"],
                       progress=False)
