"""YAML transform recipes: typed sections, `extends`, dotted overrides, and errors that name the bad key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import RecipeError
from .quantization.settings import QuantizationSettings
from .parallel.settings import ParallelSettings
from .runtime.settings import EngineSettings

BUILTIN_RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "default"


@dataclass
class ModelSettings:
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's half type (else bfloat16) on GPU
    device: str = "auto"
    trust_remote_code: bool = False
    # the HF attention code that is exported: auto (sdpa where the class supports it, else eager) | sdpa | eager
    attn_implementation: str = "auto"
    config_only: bool = False  # random weights from the config alone, no checkpoint needed


@dataclass
class ExportSettings:
    max_batch_size: int = 256
    max_seq_len: int = 8192  # the graph's token dimension: the most tokens one forward takes

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise RecipeError(f"export.{name} must be >= 1, not {getattr(self, name)}")


@dataclass
class Recipe:
    name: str
    model: ModelSettings = field(default_factory=ModelSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    transforms: dict = field(default_factory=dict)  # name -> config object, in recipe order
    runtime: EngineSettings = field(default_factory=EngineSettings)  # what LLM(...) / the engine start with
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)  # quantize_* transforms
    parallel: ParallelSettings = field(default_factory=ParallelSettings)  # tensor / expert parallel ranks


_SECTIONS = {"model": ModelSettings, "export": ExportSettings, "runtime": EngineSettings,
             "quantization": QuantizationSettings, "parallel": ParallelSettings}
_TOP_KEYS = ["extends", "model", "export", "transforms", "runtime", "quantization", "parallel"]


def _recipe_path(recipe: str | Path, relative_to: Path | None = None) -> Path:
    candidates = [Path(recipe)]
    if relative_to is not None:
        candidates.insert(0, relative_to / recipe)
    candidates.append(BUILTIN_RECIPES / f"{recipe}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    builtins = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    raise RecipeError(f"recipe '{recipe}' not found (a YAML path or a built-in: {', '.join(builtins)})")


def _load_raw(recipe: str | Path, relative_to: Path | None = None, seen: tuple = ()) -> DictConfig:
    path = _recipe_path(recipe, relative_to).resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} extends itself")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise RecipeError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping")
    _check_stage_order([n for n in (raw.get("transforms") or {}) if _is_known(n)])
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base = _load_raw(base_name, path.parent, seen + (path,))
    return OmegaConf.merge(base, raw)


def _check_keys(where: str, keys, valid) -> None:
    for k in keys:
        if k not in valid:
            raise RecipeError(f"unknown key '{where}{k}'; valid keys: {', '.join(valid)}")


def _typed(where: str, cls: type, node) -> object:
    node = node if node is not None else {}
    if not isinstance(node, (dict, DictConfig)):
        raise RecipeError(f"'{where}' must be a mapping, got {node!r}")
    schema = OmegaConf.structured(cls)
    _check_keys(f"{where}.", node.keys(), list(schema.keys()))
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, node))
    except OmegaConfBaseException as e:
        raise RecipeError(f"bad value in '{where}': {str(e).splitlines()[0]}") from None


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """Load a recipe (built-in name or YAML path), apply `key=value` overrides, validate everything."""
    from autodeploy.transforms import TRANSFORMS

    raw = _load_raw(recipe or DEFAULT_RECIPE)
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override '{o}' must look like key.path=value")
        try:  # values are parsed as YAML: `[*x*]` reads as an alias, a stray `: ` as a mapping
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([o]))
        except yaml.YAMLError as e:
            raise RecipeError(f"override '{o}': its value is not valid YAML ({str(e).splitlines()[0]}); quote "
                              f"strings that start with * & ! or hold ': ' (e.g. key='[\"*x*\"]')") from None
        except OmegaConfBaseException as e:
            raise RecipeError(f"bad override: {str(e).splitlines()[0]}") from None
    _check_keys("", raw.keys(), _TOP_KEYS)

    result = Recipe(name=str(recipe or DEFAULT_RECIPE))
    for section, cls in _SECTIONS.items():
        setattr(result, section, _typed(section, cls, raw.get(section)))

    names = list((raw.get("transforms") or {}).keys())
    _check_keys("transforms.", names, sorted(TRANSFORMS))
    # Each file lists its transforms in stage order (checked on load); merging a recipe with the one
    # it extends appends new names, so the merged list is put back in stage order (stable).
    for name in sorted(names, key=lambda n: TRANSFORMS[n].stage):
        cls = TRANSFORMS[name]
        result.transforms[name] = _typed(f"transforms.{name}", cls.config_cls, raw.transforms[name])
    _wire_kv_cache_dtype(result)
    return result


def _wire_kv_cache_dtype(recipe: Recipe) -> None:
    """`quantization.kv_cache_dtype: fp8` is the cache's dtype, which insert_kv_cache creates."""
    if recipe.quantization.kv_cache_dtype == "auto":
        return
    cache = recipe.transforms.get("insert_kv_cache")
    if cache is None or not hasattr(cache, "dtype"):
        raise RecipeError("quantization.kv_cache_dtype needs the insert_kv_cache transform with a dtype setting")
    cache.dtype = recipe.quantization.kv_cache_dtype


def _is_known(name: str) -> bool:
    from autodeploy.transforms import TRANSFORMS

    return name in TRANSFORMS


def _check_stage_order(names: list[str]) -> None:
    from autodeploy.transforms import TRANSFORMS

    for earlier, later in zip(names, names[1:]):
        if TRANSFORMS[earlier].stage > TRANSFORMS[later].stage:
            raise RecipeError(
                f"transform '{later}' (stage {TRANSFORMS[later].stage.name.lower()}) is listed after "
                f"'{earlier}' (stage {TRANSFORMS[earlier].stage.name.lower()}); stages run in the order "
                "pattern, sharding, quantization, weight_loading, fusion, cache, compile"
            )
