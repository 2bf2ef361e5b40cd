"""Shared fixtures: small checkpoints made on the fly, the embedded default model, offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import autodeploy  # noqa: E402,F401  (first: keeps the checkout's root, whose kernels/ shadows HF's `kernels`, off sys.path)
import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run in the interpreter on CPU machines and compiled on GPUs. `triton.jit` reads this
# when a kernel module is first imported, so it is set once here, before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """`pytestmark = pytest.mark.usefixtures("one_torch_thread")`: the module's steps run on one thread."""
    from runtime_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def default_model_dir():
    from autodeploy.default_model import ensure_default_model

    return ensure_default_model()


def save_tiny_checkpoint(path, config) -> None:
    """Seeded random-weight HF checkpoint of `config` in `path` (config.json + safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    save_tiny_checkpoint(path, config)
    return path
