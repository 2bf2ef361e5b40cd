"""`model.attn_implementation: auto` (the default) picks sdpa where the class supports it, else eager."""

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig

from autodeploy.loading import ModelSource, build_meta_model
from autodeploy.recipe import load_recipe


def _source(config) -> ModelSource:
    return ModelSource(name=config.model_type, path=None, config=config)


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def test_default_recipe_is_auto():
    assert load_recipe().model.attn_implementation == "auto"


@pytest.mark.parametrize("config,picked", [(LlamaConfig(**TINY), "sdpa"), (Gemma2Config(**TINY), "eager")],
                         ids=["llama-sdpa", "gemma2-eager"])
def test_auto_picks_what_the_class_supports(config, picked):
    model = build_meta_model(_source(config), torch.float32, "auto")
    assert model.config._attn_implementation == picked


def test_explicit_choice_is_honoured():
    model = build_meta_model(_source(LlamaConfig(**TINY)), torch.float32, "eager")
    assert model.config._attn_implementation == "eager"
