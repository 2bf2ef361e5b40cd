"""Find a model, read its config, and build it on the meta device (no weights in memory yet).

Weights are streamed later by the `load_weights` transform, after the graph has been rewritten, so
that sharding and quantization decide what each device loads.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelNotFoundError, UnsupportedModelError, WeightLoadingError

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


@dataclass
class ModelSource:
    """A resolved model: local folder, config, and (unless config-only) its safetensors files."""

    name: str
    path: Path
    config: "object"
    weight_files: list[Path] = field(default_factory=list)
    trust_remote_code: bool = False


def _download_from_hub(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as first_error:  # offline, unknown id, gated: try what is cached locally
        try:
            return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except Exception:
            reason = str(first_error).strip().splitlines()[0] if str(first_error).strip() else type(first_error).__name__
            raise ModelNotFoundError(
                f"model '{model_id}' is neither a local folder nor reachable on the Hugging Face hub ({reason})"
            ) from None


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A local folder for `model`: the default model when None, a path as is, else a hub id."""
    if model is None:
        from .default_model import ensure_default_model

        return ensure_default_model()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelNotFoundError(f"'{model}' is not a Hugging Face model folder (no config.json in it)")
        return path
    if str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ModelNotFoundError(f"model folder '{model}' does not exist")
    return _download_from_hub(str(model))


def load_config(path: Path, trust_remote_code: bool = False):
    """Read config.json and check that it describes a causal LM that transformers can build."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:  # unknown model_type or remote code refused
        raise UnsupportedModelError(f"cannot read the config in {path}: {str(e).splitlines()[0]}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None
    has_remote_lm = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not (_is_causal_lm(config) or (trust_remote_code and has_remote_lm)):
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnsupportedModelError(
            f"{path.name} is a '{config.model_type}' model ({archs}), not a causal language model; "
            "autodeploy optimizes models that AutoModelForCausalLM can build"
        )
    return config


def _is_causal_lm(config) -> bool:
    """A causal-LM model type whose checkpoint (if it says) holds a causal-LM head, not e.g. BertModel."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    archs = getattr(config, "architectures", None) or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return not archs or any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def find_weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, each opened once to reject corrupt headers early."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadingError(f"no *.safetensors weights in {path} (use --config-only for random weights)")
    for f in files:
        if not f.exists():
            raise WeightLoadingError(f"weight file {f} named in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:
            raise WeightLoadingError(f"corrupt safetensors file {f}: {str(e).splitlines()[0]}") from None
    return files


def resolve_model(
    model: str | os.PathLike | None, trust_remote_code: bool = False, config_only: bool = False
) -> ModelSource:
    path = resolve_model_path(model)
    config = load_config(path, trust_remote_code)
    files = [] if config_only else find_weight_files(path)
    name = str(model) if model is not None else path.name
    return ModelSource(name=name, path=path, config=config, weight_files=files, trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: str, config, device: torch.device) -> torch.dtype:
    """'auto' means float32 on CPU (the reference setting) and the checkpoint's half type on GPU."""
    if dtype != "auto":
        try:
            return getattr(torch, dtype)
        except AttributeError:
            raise UnsupportedModelError(f"unknown dtype '{dtype}'") from None
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hf_attn_implementation(name: str) -> str | None:
    """What to pass transformers as `attn_implementation`: 'auto' is None, which makes transformers take
    sdpa where the class supports it and eager otherwise (both are matched); anything else as is."""
    return None if name == "auto" else name


def build_meta_model(source: ModelSource, dtype: torch.dtype, attn_implementation: str = "auto"):
    """The HF model entirely on the meta device (values of init-computed buffers are kept aside)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                source.config,
                dtype=dtype,
                attn_implementation=hf_attn_implementation(attn_implementation),
                trust_remote_code=source.trust_remote_code,
            )
    except ValueError as e:
        raise UnsupportedModelError(f"transformers cannot build {source.name}: {str(e).splitlines()[0]}") from None
    model.tie_weights()  # tied embeddings become one parameter in the graph, loaded once
    _buffers_to_meta(model)
    return model.eval()


_INIT_BUFFERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def initial_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Values of the non-persistent buffers `build_meta_model` computed at init (RoPE inv_freq, ...)."""
    return _INIT_BUFFERS.get(model, {})


def _buffers_to_meta(model: torch.nn.Module) -> None:
    """Every buffer goes to meta, so the whole forward traces on one device.

    HF code that mixes a real buffer with meta activations either fails (a CPU buffer times meta
    positions) or moves it to meta inside the forward, where export keeps a data-less copy. Persistent
    buffers (e.g. a router's score-correction bias) load from the checkpoint like parameters;
    non-persistent ones are computed at init, so their values are kept for `load_weights`.
    """
    values = {}
    for path, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or buf.is_meta:
                continue
            persistent = name not in module._non_persistent_buffers_set
            if not persistent:
                values[f"{path}.{name}" if path else name] = buf
            module.register_buffer(name, buf.to("meta"), persistent=persistent)
    _INIT_BUFFERS[model] = values


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)


def load_tokenizer_or_none(source: ModelSource):
    """The tokenizer, or None for a bare checkpoint (then prompts are token ids and text is empty).
    ImportError too: a bare checkpoint of a type whose tokenizer needs a missing package (BioGPT)."""
    try:
        return load_tokenizer(source)
    except (OSError, ValueError, TypeError, ImportError):
        return None
