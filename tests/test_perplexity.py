"""autodeploy/eval/perplexity.py and `autodeploy eval-ppl`: windows, a known answer, HF eager as reference."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from autodeploy.cli import main
from autodeploy.eval.perplexity import PerplexityInputError, perplexity, text_token_ids, windows

TEXT = Path(__file__).parent / "data" / "shakespeare_coriolanus.txt"


@pytest.mark.parametrize("n,window,stride", [(2, 2, 2), (10, 4, 4), (11, 4, 1), (100, 16, 5), (7, 32, 16), (33, 8, 7)])
def test_windows_score_every_token_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert begin < first and end - begin <= window  # a scored token always has context in its window


@pytest.mark.parametrize("window,stride", [(1, 1), (8, 0), (8, 9)])
def test_bad_windows_are_refused(window, stride):
    with pytest.raises(PerplexityInputError):
        windows(10, window, stride)


def test_known_answers():
    vocab, ids = 7, [3, 1, 4, 1, 5, 2, 6, 0, 3, 5]
    uniform = lambda x: torch.zeros(*x.shape, vocab)  # noqa: E731
    assert perplexity(uniform, ids, window=4).perplexity == pytest.approx(vocab)

    def teacher(x):  # p = 3/4 on the true next token, wherever the window sits: perplexity 4/3
        row = x[0].tolist()
        start = next(i for i in range(len(ids)) if ids[i:i + len(row)] == row)
        logits = torch.zeros(1, len(row), vocab)
        for j in range(len(row)):
            if start + j + 1 < len(ids):
                logits[0, j, ids[start + j + 1]] = math.log(3 * (vocab - 1))  # p(true) = 3/4
        return logits
    for stride in (1, 3, 4):
        assert perplexity(teacher, ids, window=4, stride=stride).perplexity == pytest.approx(4 / 3)


def test_text_is_long_enough(default_model_dir):
    from transformers import AutoTokenizer

    assert len(text_token_ids(AutoTokenizer.from_pretrained(default_model_dir), TEXT)) >= 4000


def test_optimized_model_matches_hf_eager(tiny_llama_dir):
    from autodeploy.agreement import load_hf_reference
    from autodeploy.eval.perplexity import model_perplexity
    from autodeploy.optimizer import optimize_model

    opt = optimize_model(tiny_llama_dir, overrides=["model.dtype=float32"], progress=False)
    hf = load_hf_reference(opt)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = model_perplexity(opt, ids, window=64, stride=48)
    ref = perplexity(lambda x: hf(x).logits, ids, window=64, stride=48)
    assert (ours.tokens, ours.windows) == (199, ref.windows)
    assert ours.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    assert 200 < ref.perplexity < 300  # random weights on 256 tokens: close to uniform
    with pytest.raises(PerplexityInputError, match="exceeds the KV cache"):
        model_perplexity(opt, ids, window=10**7)


def test_cli(tiny_llama_dir, tmp_path, capsys):
    from autodeploy.bench.tokenizer import synthetic_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    synthetic_tokenizer(256).save_pretrained(model)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{(7 * i) % 256}" for i in range(300)))
    report = tmp_path / "ppl.json"
    assert main(["eval-ppl", str(model), "--text", str(text), "--window", "128", "--stride", "64",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "299 tokens scored in 4 windows of 128 (stride 64): perplexity" in out
    assert '"perplexity"' in report.read_text()

    assert main(["eval-ppl", str(model), "--text", str(tmp_path / "missing.txt")]) == 2
    assert main(["eval-ppl", str(model), "--text", str(text), "--window", "1"]) == 2
    assert main(["eval-ppl", str(tiny_llama_dir), "--text", str(text)]) == 2  # no tokenizer
    err = capsys.readouterr().err
    assert "no such file" in err and "--window must be >= 2" in err and "has no tokenizer" in err
