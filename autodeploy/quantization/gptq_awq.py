"""GPTQ and AWQ checkpoints (quantization_config in config.json), converted to the canonical packed layout.

Published layouts (AutoGPTQ / GPTQModel `gptq` format, AutoAWQ `gemm` version), per linear [N, K]:
- GPTQ: qweight int32 [K*bits/32, N], codes packed along K (column k's code in word k // (32/bits)
  at bit (k % (32/bits)) * bits); qzeros int32 [G, N*bits/32] packed along N the same way, stored
  minus one in checkpoint_format `gptq` (v1), as is in `gptq_v2`; scales [G, N]; g_idx int32 [K]
  (the group of each column; act-order when desc_act).
- AWQ: qweight int32 [K, N/8] and qzeros [G, N/8], 4-bit codes packed along N in the interleaved
  order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column order[i] of its 8); scales [G, N]; no g_idx.
w[n, k] = (code - zero) * scale in both. Conversion (once, at load) unpacks the codes, transposes
them to [N, K] and repacks along K; zeros and scales are transposed to [N, G]. Zeros are kept
explicitly (symmetric checkpoints store them too), so the result is exact.
"""

from __future__ import annotations

from functools import partial

import torch

from autodeploy.kernels.quant_format import pack_int

from .checkpoint import CheckpointFormat, unsupported
from .loading import LayerLoad
from .schemes import LinearScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
STORED_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def stored_dim(name: str, weight_dim: int, act_order: bool) -> int | None:
    """The dim of stored tensor `name` that runs along the linear weight's dim `weight_dim` (0: out
    features N, 1: in features K), for tensor-parallel slices; None: it has none, every rank reads it
    whole. Codes, zeros and scales are stored transposed ([K or G, N]); g_idx is [K]; with act-order a
    slice of K still indexes the whole row's groups, so its scales and zeros keep all of them."""
    if name == "g_idx":
        return 0 if weight_dim == 1 else None
    if act_order and weight_dim == 1 and name != "qweight":
        return None
    return 1 - weight_dim


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along R (GPTQ qweight) -> codes [R * 32/bits, C]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = (words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
    return codes.reshape(-1, words.shape[1])


def _unpack_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] packed along C -> codes [R, C * 32/bits]; `order[i]`: the column nibble i holds."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = (words[..., None] >> shifts) & (2**bits - 1)  # [R, C, nibble]
    if order is not None:
        codes = codes[..., torch.tensor(order, device=words.device).argsort()]
    return codes.reshape(words.shape[0], -1)


def _build(path: str, bits: int, zero_offset: int, order, with_g_idx: bool, scale_dtype: torch.dtype,
           tensors: dict) -> dict[str, torch.Tensor]:
    scales = tensors[f"{path}.scales"]
    if order is None:  # GPTQ: codes packed along K
        codes = _unpack_rows(tensors[f"{path}.qweight"], bits).t()
    else:  # AWQ: codes packed along N
        codes = _unpack_cols(tensors[f"{path}.qweight"], bits, order).t()
    zeros = _unpack_cols(tensors[f"{path}.qzeros"], bits, order)[:, : scales.shape[1]] + zero_offset
    out = {"qweight": pack_int(codes.contiguous(), bits), "scales": scales.t().contiguous().to(scale_dtype),
           "zeros": zeros.t().contiguous().to(scale_dtype)}
    if with_g_idx:
        out["g_idx"] = tensors[f"{path}.g_idx"].to(torch.int32)
    return out


class _PackedIntFormat(CheckpointFormat):
    def scheme_for(self, path: str) -> LinearScheme | None:
        if f"{path}.qweight" not in self.keys:
            return None
        bits, group_size = int(self.config.get("bits", 4)), int(self.config.get("group_size", 128))
        self._check(bits)
        return LinearScheme("int", bits=bits, group_size=group_size, symmetric=False, act_order=self._act_order())

    def _check(self, bits: int) -> None:
        raise NotImplementedError

    def _act_order(self) -> bool:
        return False


class GptqFormat(_PackedIntFormat):
    method = "gptq"

    def _check(self, bits: int) -> None:
        if bits not in (4, 8):
            raise unsupported("gptq", f"{bits}-bit weights")
        if self.config.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise unsupported("gptq", f"checkpoint_format {self.config.get('checkpoint_format')}")

    def _act_order(self) -> bool:
        return bool(self.config.get("desc_act"))

    def layer_load(self, path, scheme, out_features, in_features, scale_dtype, params) -> LayerLoad:
        n, k, bits = out_features, in_features, scheme.bits
        groups = scheme.groups or (1 if scheme.group_size == -1 else -(-k // scheme.group_size))
        sources = {f"{path}.qweight": (k * bits // 32, n), f"{path}.qzeros": (groups, n * bits // 32),
                   f"{path}.scales": (groups, n)}
        if scheme.act_order:
            sources[f"{path}.g_idx"] = (k,)
        offset = 1 if self.config.get("checkpoint_format", "gptq") == "gptq" else 0
        return LayerLoad(sources, partial(_build, path, bits, offset, None, scheme.act_order, scale_dtype), params)


class AwqFormat(_PackedIntFormat):
    method = "awq"

    def _check(self, bits: int) -> None:
        version = str(self.config.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm":
            raise unsupported("awq", f"{bits}-bit {version} checkpoints")
        if not self.config.get("zero_point", True):
            raise unsupported("awq", "checkpoints without zero points")

    def layer_load(self, path, scheme, out_features, in_features, scale_dtype, params) -> LayerLoad:
        n, k = out_features, in_features
        groups = 1 if scheme.group_size == -1 else k // scheme.group_size
        sources = {f"{path}.qweight": (k, n // 8), f"{path}.qzeros": (groups, n // 8), f"{path}.scales": (groups, n)}
        return LayerLoad(sources, partial(_build, path, 4, 0, AWQ_ORDER, False, scale_dtype), params)
