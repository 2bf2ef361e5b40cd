"""Recipes: built-in default, extends, dotted overrides, and errors that name the bad key."""

import pytest

from autodeploy.errors import RecipeError
from autodeploy.recipe import load_recipe
from autodeploy.transforms import TRANSFORMS, Stage, Transform


def test_default_recipe_loads_with_typed_sections():
    recipe = load_recipe()
    assert recipe.model.device == "auto"
    assert "load_weights" in recipe.transforms
    assert all(name in TRANSFORMS for name in recipe.transforms)


def test_runtime_section_defaults_and_typed_overrides():
    from autodeploy.runtime.settings import EngineSettings

    assert load_recipe().runtime == EngineSettings()  # the YAML's runtime section spells out the defaults
    recipe = load_recipe(None, ["runtime.cuda_graph_batch_sizes=[1,4]", "runtime.max_batch_size=8",
                                "runtime.cuda_graph_prefill_tokens=[]", "runtime.seed=3"])
    assert recipe.runtime == EngineSettings(max_batch_size=8, seed=3, cuda_graph_batch_sizes=(1, 4),
                                            cuda_graph_prefill_tokens=())


def test_dotted_overrides_are_typed():
    recipe = load_recipe(None, ["transforms.load_weights.seed=7", "model.dtype=bfloat16", "export.max_seq_len=128"])
    assert recipe.transforms["load_weights"].seed == 7
    assert recipe.model.dtype == "bfloat16"
    assert recipe.export.max_seq_len == 128


@pytest.mark.parametrize(
    "override, named",
    [
        ("transforms.load_weights.sed=1", "transforms.load_weights.sed"),
        ("transforms.no_such_transform.enabled=false", "transforms.no_such_transform"),
        ("modle.dtype=float32", "modle"),
        ("export.max_seqlen=4", "export.max_seqlen"),
        ("runtime.max_batch=4", "runtime.max_batch"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(override, named):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert f"'{named}'" in str(err.value) and "valid keys" in str(err.value)


def test_bad_value_type_is_an_error():
    with pytest.raises(RecipeError, match="bad value"):
        load_recipe(None, ["export.max_seq_len=lots"])


@pytest.mark.parametrize("override", ["quantization.exclude=[*router*,*.gate]", "runtime.max_batch=: x: 1"])
def test_override_value_that_is_not_yaml_is_one_line(override):
    with pytest.raises(RecipeError, match="not valid YAML.*quote") as err:
        load_recipe(None, [override])
    assert "\n" not in str(err.value)


def test_quoted_glob_override_is_a_list():
    recipe = load_recipe(None, ['quantization.exclude=["*router*","*.gate"]'])
    assert recipe.quantization.exclude == ["*router*", "*.gate"]


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(None, ["transforms.load_weights.enabled"])


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="default"):
        load_recipe("no-such-recipe")


def test_extends_merges_and_overrides(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: default\nmodel:\n  dtype: float16\n")
    recipe = load_recipe(tmp_path / "mine.yaml")
    assert recipe.model.dtype == "float16"
    assert list(recipe.transforms) == list(load_recipe().transforms)


def test_self_extension_is_caught(tmp_path):
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(tmp_path / "loop.yaml")


def test_stage_order_is_checked(tmp_path, monkeypatch):
    class LateFusion(Transform):
        name, stage = "test_late_fusion", Stage.FUSION

    monkeypatch.setitem(TRANSFORMS, LateFusion.name, LateFusion)
    (tmp_path / "bad.yaml").write_text("transforms:\n  test_late_fusion: {}\n  load_weights: {}\n")
    with pytest.raises(RecipeError, match="stages run in the order"):
        load_recipe(tmp_path / "bad.yaml")


def test_extending_recipe_transforms_fall_into_stage_order(tmp_path, monkeypatch):
    class EarlyPattern(Transform):
        name, stage = "test_early_pattern", Stage.PATTERN

    monkeypatch.setitem(TRANSFORMS, EarlyPattern.name, EarlyPattern)
    (tmp_path / "more.yaml").write_text("extends: default\ntransforms:\n  test_early_pattern: {}\n")
    names = list(load_recipe(tmp_path / "more.yaml").transforms)
    assert names.index("test_early_pattern") < names.index("load_weights")


@pytest.mark.parametrize("override,named", [
    ("runtime.max_batch_size=0", "runtime.max_batch_size"), ("runtime.max_seq_len=-1", "runtime.max_seq_len"),
    ("runtime.seed=-3", "runtime.seed"), ("runtime.cuda_graph_batch_sizes=[1,0]", "runtime.cuda_graph_batch_sizes"),
    ("export.max_seq_len=0", "export.max_seq_len"), ("transforms.insert_kv_cache.block_size=0", "block_size"),
    ("transforms.insert_kv_cache.free_memory_fraction=1.5", "free_memory_fraction")])
def test_values_out_of_range_are_named(override, named):
    with pytest.raises(RecipeError, match=named):
        load_recipe(None, [override])


def test_runtime_keyword_out_of_range_is_a_recipe_error():
    """LLM(...) keywords reach the settings through dataclasses.replace, which checks them the same way."""
    from dataclasses import replace

    with pytest.raises(RecipeError, match="max_batch_size"):
        replace(load_recipe(None).runtime, max_batch_size=-3)
