"""State-space and linear-attention layers as canonical ops: short causal conv1d, Mamba-1 selective
scan, Mamba-2 (SSD) scan and the gated delta rule, each in two forms.

- The plain form (`causal_conv1d`, `selective_scan`, `ssd_scan`, `gated_delta_rule`) runs whole
  sequences from a zero state, in HF's layouts: what an export patch puts in the graph.
- The cached form (`cached_*`) runs a packed batch (batch dim 1, the new tokens of B sequences along
  the sequence dim, `cu_seqlens` [B + 1] and `seq_lens` [B] as for cached attention) and carries each
  sequence's state in a **state slot**: `states[state_slots[b]]` (conv: the last k - 1 inputs;
  scans: the SSM / delta-rule state). A sequence whose whole context is new this step
  (seq_lens[b] == its new tokens) starts from zero, whatever the slot holds, so a slot needs no
  clearing when it is reused or its sequence is preempted and recomputed; a chunked prefill or a
  decode step continues from the slot. The final state is written back in place.

The references loop over tokens in float32 (the ground truth on CPU; fused Triton scans may
follow). Every recurrence is written once, as `step(state, inputs_t) -> (state, out_t)`, and the
plain and cached ops drive it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]


def _activation(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"causal_conv1d: unsupported activation {activation!r} (silu or none)")


def _scan(step: Step, state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Run `step` over dim 0 of every input ([s, ...]); returns (outputs [s, ...], final state)."""
    outs = []
    for t in range(inputs[0].shape[0]):
        state, out = step(state, tuple(x[t] for x in inputs))
        outs.append(out)
    return torch.stack(outs), state


def _packed(step: Step, inputs: tuple[Tensor, ...], states: Tensor, cu_seqlens: Tensor, seq_lens: Tensor,
            state_slots: Tensor) -> Tensor:
    """`_scan` per sequence of a packed batch (inputs [T, ...]), reading and writing its state slot."""
    starts, lens, slots = cu_seqlens.tolist(), seq_lens.tolist(), state_slots.tolist()
    outs = []
    for b, slot in enumerate(slots):
        start, end = starts[b], starts[b + 1]
        fresh = lens[b] == end - start
        state = torch.zeros_like(states[slot], dtype=torch.float32) if fresh else states[slot].float()
        out, state = _scan(step, state, tuple(x[start:end] for x in inputs))
        states[slot] = state.to(states.dtype)
        outs.append(out)
    return torch.cat(outs) if outs else inputs[0].new_empty(0)


# ---- short causal conv1d (Mamba, Mamba-2, gated delta net, LFM2) --------------------------------------------

def _conv_step(weight: Tensor, bias: Tensor | None, activation: str | None) -> Step:
    """State [c, k - 1]: the previous inputs; one step convolves them with the new input [c]."""
    def step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        window = torch.cat([state, inputs[0][:, None]], dim=1)  # [c, k]
        out = (window * weight).sum(-1) + (bias if bias is not None else 0.0)
        return window[:, 1:], _activation(out, activation)
    return step


@torch.library.custom_op("autodeploy::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Depthwise causal conv: x [b, c, s], weight [c, k] -> [b, c, s] (HF's causal_conv1d_fn)."""
    step = _conv_step(weight.float(), None if bias is None else bias.float(), activation)
    state = x.new_zeros(x.shape[1], weight.shape[1] - 1, dtype=torch.float32)
    out = [_scan(step, state, (seq.float().transpose(0, 1),))[0].transpose(0, 1) for seq in x]
    return torch.stack(out).to(x.dtype)


@causal_conv1d.register_fake
def _(x, weight, bias=None, activation=None):
    return torch.empty_like(x)


@torch.library.custom_op("autodeploy::cached_causal_conv1d", mutates_args=("conv_states",))
def cached_causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, conv_states: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, state_slots: Tensor,
) -> Tensor:
    """Packed x [1, c, T]; conv_states [num_slots, c, k - 1] -> [1, c, T]."""
    step = _conv_step(weight.float(), None if bias is None else bias.float(), activation)
    out = _packed(step, (x[0].float().transpose(0, 1),), conv_states, cu_seqlens, seq_lens, state_slots)
    return out.transpose(0, 1)[None].to(x.dtype)


@cached_causal_conv1d.register_fake
def _(x, weight, bias, activation, conv_states, cu_seqlens, seq_lens, state_slots):
    return torch.empty_like(x)


# ---- gated delta rule (Qwen3-Next, OLMo hybrid, Kimi linear) ------------------------------------------------

def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _delta_step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """State [h, d_k, d_v]: S <- exp(g) S + k (beta (v - exp(g) S^T k))^T; out = S^T q."""
    q, k, v, g, beta = inputs  # [h, d_k], [h, d_k], [h, d_v], [h], [h]
    state = state * g.exp()[:, None, None]
    delta = (v - (state * k[:, :, None]).sum(1)) * beta[:, None]
    state = state + k[:, :, None] * delta[:, None, :]
    return state, (state * q[:, :, None]).sum(1)


def _delta_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, qk_l2norm: bool) -> tuple[Tensor, ...]:
    """[..., s, h, d] in fp32 with k/q heads repeated to v's, normalised and q scaled by d_k ** -0.5."""
    rep = v.shape[-2] // k.shape[-2]
    q, k = (x.float().repeat_interleave(rep, dim=-2) for x in (q, k))
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v.float(), g.float(), beta.float()


@torch.library.custom_op("autodeploy::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, qk_l2norm: bool = True) -> Tensor:
    """q, k [b, s, h_k, d_k], v [b, s, h_v, d_v], g (log decay) and beta [b, s, h_v] -> [b, s, h_v, d_v]."""
    inputs = _delta_inputs(q, k, v, g, beta, qk_l2norm)
    state = q.new_zeros(v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return torch.stack([_scan(_delta_step, state, seq)[0] for seq in zip(*inputs)]).to(v.dtype)


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, qk_l2norm=True):
    return torch.empty_like(v)


@torch.library.custom_op("autodeploy::cached_gated_delta_rule", mutates_args=("ssm_states",))
def cached_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, qk_l2norm: bool, ssm_states: Tensor,
    cu_seqlens: Tensor, seq_lens: Tensor, state_slots: Tensor,
) -> Tensor:
    """Packed [1, T, h, d] inputs; ssm_states [num_slots, h_v, d_k, d_v] -> [1, T, h_v, d_v]."""
    inputs = tuple(x[0] for x in _delta_inputs(q, k, v, g, beta, qk_l2norm))
    return _packed(_delta_step, inputs, ssm_states, cu_seqlens, seq_lens, state_slots)[None].to(v.dtype)


@cached_gated_delta_rule.register_fake
def _(q, k, v, g, beta, qk_l2norm, ssm_states, cu_seqlens, seq_lens, state_slots):
    return torch.empty_like(v)


# ---- Mamba-2 SSD scan (Mamba-2, Bamba, Nemotron-H, Falcon-H1, Granite hybrid, Zamba2) ------------------------

def _ssd_step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """State [h, p, n]: h <- exp(dt A) h + dt x B^T; y = h C + D x (B, C already per head)."""
    x, dt, a, b, c, d = inputs  # [h, p], [h], [h], [h, n], [h, n], [h]
    state = state * (dt * a).exp()[:, None, None] + (dt[:, None] * x)[:, :, None] * b[:, None, :]
    return state, (state * c[:, None, :]).sum(-1) + d[:, None] * x


def _ssd_inputs(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, dt_bias: Tensor | None,
                dt_softplus: bool, dt_min: float) -> tuple[Tensor, ...]:
    """[..., s, h, ...] fp32 with dt biased, softplus'ed, clamped at dt_min, and B, C groups repeated to heads."""
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(min=dt_min)
    rep = x.shape[-2] // b.shape[-2]
    b, c = (t.float().repeat_interleave(rep, dim=-2) for t in (b, c))
    shape = dt.shape
    return x.float(), dt, a.float().expand(shape), b, c, d.float().expand(shape)


@torch.library.custom_op("autodeploy::ssd_scan", mutates_args=())
def ssd_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, dt_bias: Tensor | None = None,
             dt_softplus: bool = True, dt_min: float = 0.0) -> Tensor:
    """x [bs, s, h, p], dt [bs, s, h], A and D [h], B and C [bs, s, g, n] -> y [bs, s, h, p]."""
    inputs = _ssd_inputs(x, dt, a, b, c, d, dt_bias, dt_softplus, dt_min)
    state = x.new_zeros(x.shape[2], x.shape[3], b.shape[3], dtype=torch.float32)
    return torch.stack([_scan(_ssd_step, state, seq)[0] for seq in zip(*inputs)]).to(x.dtype)


@ssd_scan.register_fake
def _(x, dt, a, b, c, d, dt_bias=None, dt_softplus=True, dt_min=0.0):
    return torch.empty_like(x)


@torch.library.custom_op("autodeploy::cached_ssd_scan", mutates_args=("ssm_states",))
def cached_ssd_scan(
    x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, dt_bias: Tensor | None, dt_softplus: bool,
    dt_min: float, ssm_states: Tensor, cu_seqlens: Tensor, seq_lens: Tensor, state_slots: Tensor,
) -> Tensor:
    """Packed [1, T, ...] inputs; ssm_states [num_slots, h, p, n] -> [1, T, h, p]."""
    inputs = tuple(t[0] for t in _ssd_inputs(x, dt, a, b, c, d, dt_bias, dt_softplus, dt_min))
    return _packed(_ssd_step, inputs, ssm_states, cu_seqlens, seq_lens, state_slots)[None].to(x.dtype)


@cached_ssd_scan.register_fake
def _(x, dt, a, b, c, d, dt_bias, dt_softplus, dt_min, ssm_states, cu_seqlens, seq_lens, state_slots):
    return torch.empty_like(x)


# ---- Mamba-1 selective scan (Mamba, Falcon-Mamba, Jamba) -------------------------------------------------------

def _selective_step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """State [d, n]: h <- exp(delta A) h + delta B u; y = h C + D u (A [d, n], B and C [n] per token)."""
    u, delta, a, b, c, d = inputs  # [d], [d], [d, n], [n], [n], [d]
    state = (delta[:, None] * a).exp() * state + (delta * u)[:, None] * b[None, :]
    return state, (state * c[None, :]).sum(-1) + d * u


def _selective_inputs(u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                      delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, ...]:
    """Token-major fp32 inputs ([..., s, d] / [..., s, n]) from Mamba's channel-major [..., d, s] / [..., n, s]."""
    delta = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    delta = F.softplus(delta) if delta_softplus else delta
    u, delta, b, c = (t.float().transpose(-1, -2) for t in (u, delta, b, c))
    lead = u.shape[:-1]
    return u, delta, a.float().expand(*lead, *a.shape), b, c, d.float().expand(*lead, d.shape[0])


@torch.library.custom_op("autodeploy::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                   delta_bias: Tensor | None = None, delta_softplus: bool = True) -> Tensor:
    """u, delta [bs, d, s], A [d, n], B, C [bs, n, s], D [d] -> y [bs, d, s] (no gate: HF multiplies it after)."""
    inputs = _selective_inputs(u, delta, a, b, c, d, delta_bias, delta_softplus)
    state = u.new_zeros(a.shape, dtype=torch.float32)
    out = torch.stack([_scan(_selective_step, state, seq)[0] for seq in zip(*inputs)])
    return out.transpose(1, 2).to(u.dtype)


@selective_scan.register_fake
def _(u, delta, a, b, c, d, delta_bias=None, delta_softplus=True):
    return torch.empty_like(u)


@torch.library.custom_op("autodeploy::cached_selective_scan", mutates_args=("ssm_states",))
def cached_selective_scan(
    u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, delta_bias: Tensor | None,
    delta_softplus: bool, ssm_states: Tensor, cu_seqlens: Tensor, seq_lens: Tensor, state_slots: Tensor,
) -> Tensor:
    """Packed u, delta [1, d, T], B, C [1, n, T]; ssm_states [num_slots, d, n] -> [1, d, T]."""
    inputs = tuple(t[0] for t in _selective_inputs(u, delta, a, b, c, d, delta_bias, delta_softplus))
    out = _packed(_selective_step, inputs, ssm_states, cu_seqlens, seq_lens, state_slots)
    return out.transpose(0, 1)[None].to(u.dtype)


@cached_selective_scan.register_fake
def _(u, delta, a, b, c, d, delta_bias, delta_softplus, ssm_states, cu_seqlens, seq_lens, state_slots):
    return torch.empty_like(u)
