"""A tokenizer for models that ship none (a config folder for --config-only benchmarks).

The engine detokenizes every new token, so a benchmark needs some tokenizer; with random prompt
ids the text is meaningless anyway. A word-level vocabulary `t0 .. t{V-1}` covers every id the
model can emit, and its decode cost is of the same order as a real BPE tokenizer's.
"""

from __future__ import annotations

from autodeploy.loading import ModelSource, load_tokenizer


def synthetic_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")


def bench_tokenizer(source: ModelSource):
    """The model's own tokenizer when its folder has one, else a synthetic one of its vocab size."""
    try:
        return load_tokenizer(source)
    except (OSError, ValueError, TypeError):
        return synthetic_tokenizer(source.config.get_text_config().vocab_size)
