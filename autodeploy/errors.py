"""User-facing errors: the CLI prints them on one line and exits with code 2."""


class AutoDeployError(Exception):
    """A problem with the user's input (model, recipe, prompt), not a bug in autodeploy."""

    exit_code = 2


class ModelNotFoundError(AutoDeployError):
    pass


class UnsupportedModelError(AutoDeployError):
    pass


class RecipeError(AutoDeployError, ValueError):
    """A bad recipe key or value (also a ValueError, for API callers)."""


class SamplingParamsError(AutoDeployError, ValueError):
    """A generation setting out of its type or range (also a ValueError, for API and HTTP callers)."""


class PromptError(AutoDeployError, ValueError):
    """Prompts the model cannot take as given: text without a tokenizer, chat without a template, a prompt that
    is neither text nor token ids, prompts and sampling params of different counts."""


class RequestError(AutoDeployError):
    """A request the engine ended with an error (prompt past max_seq_len, more KV cache than there is)."""


class WeightLoadingError(AutoDeployError):
    pass


class QuantizationError(AutoDeployError, ValueError):
    """A quantization scheme or layout that cannot be honoured (also a ValueError, for API callers)."""


class ShardingError(AutoDeployError, ValueError):
    """A model that cannot be split over the requested number of ranks (e.g. head counts)."""


class WorkerError(AutoDeployError, RuntimeError):
    """A tensor-parallel worker process died or stopped answering."""
