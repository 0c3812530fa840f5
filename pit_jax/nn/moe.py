"""`pit_jax.nn.MoE`: a dropless top-k Mixture-of-Experts FFN as a flax.nnx Module.

Router: linear gate (no bias) -> softmax (fp32) -> top-k, optionally renormalised over the k.
Auxiliary losses are sown as `nnx.Intermediate` values (read them with
`y, aux = nnx.capture(model, nnx.Intermediate)(x)` on flax >= 0.12.8, which deprecates sowing
outside `capture`, or with `nnx.pop(model, nnx.Intermediate)` after a call on older flax):
  - `load_balancing_loss`: Switch Transformer's E · Σ_e f_e · P_e, with f_e the fraction of the
    T·k assignments that went to expert e and P_e the mean router probability of e (1.0 when
    balanced, for any k); `load_balancing="sum_over_choices"` takes f_e over the T tokens
    instead (the fraction of tokens with e among their k choices), which sums the loss over the k
    choices as flaxformer's and Hugging Face transformers' top-k MoE losses do: k times the
    default, k when balanced;
  - `router_z_loss`: mean over tokens of logsumexp(logits)² (ST-MoE);
  - `dropped_fraction` (only with `capacity_factor`): share of assignments dropped.
Dropless by default; `capacity_factor=c` keeps at most ceil(c·T·k/E) assignments per expert
(every token's first choice before any second choice, then token order), with flaxformer's
priority (its capacity formula differs: see `pit_jax.drop_over_capacity`);
with `batch_prioritized_routing=True`, tokens with a higher top router probability go first within
each choice (V-MoE's batch-prioritised routing).
Compute goes through the grouped matmul of `pit_jax.moe_matmul` (the PIT m-gather/scatter
kernels on GPU, the lax.ragged_dot reference on CPU), with one routing index per call shared by
all its matmuls.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import is_int, is_positive_int, is_positive_real
from ..moe import checked_operands, drop_over_capacity, fused_matmul

ACTIVATIONS = ("relu", "gelu", "swiglu")
LOAD_BALANCING = ("switch", "sum_over_choices")


class MoE(nnx.Module):
    def __init__(self, num_experts: int, top_k: int, d_model: int, d_ff: int, *,
                 activation: str = "swiglu", renormalize: bool = True,
                 capacity_factor: float | None = None, batch_prioritized_routing: bool = False,
                 load_balancing: str = "switch", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not is_positive_int(num_experts):
            raise ValueError(f"pit_jax.nn.MoE: num_experts must be a positive int, got {num_experts!r}")
        if not (is_int(top_k) and 1 <= top_k <= num_experts):
            raise ValueError(f"pit_jax.nn.MoE: top_k must be in [1, num_experts={num_experts}], got {top_k!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"pit_jax.nn.MoE: activation must be one of {ACTIVATIONS}, got {activation!r}")
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if not is_positive_int(v):
                raise ValueError(f"pit_jax.nn.MoE: {name} must be a positive int, got {v!r}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"pit_jax.nn.MoE: dtype must be a floating-point dtype, got {dtype!r}")
        num_experts, top_k, d_model, d_ff = int(num_experts), int(top_k), int(d_model), int(d_ff)
        self.num_experts, self.top_k, self.d_model, self.d_ff = num_experts, top_k, d_model, d_ff
        if capacity_factor is not None and not is_positive_real(capacity_factor):
            raise ValueError(f"pit_jax.nn.MoE: capacity_factor must be None (dropless) or > 0, got {capacity_factor!r}")
        self.activation, self.renormalize, self.dtype = activation, renormalize, dtype
        self.capacity_factor = capacity_factor
        if batch_prioritized_routing and capacity_factor is None:
            raise ValueError("pit_jax.nn.MoE: batch_prioritized_routing orders tokens for capacity dropping; "
                             "it needs a capacity_factor (the layer is dropless without one)")
        self.batch_prioritized_routing = batch_prioritized_routing
        if load_balancing not in LOAD_BALANCING:
            raise ValueError(f"pit_jax.nn.MoE: load_balancing must be one of {LOAD_BALANCING}, got {load_balancing!r}")
        self.load_balancing = load_balancing
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.router = nnx.Linear(d_model, num_experts, use_bias=False, dtype=jnp.float32,
                                 param_dtype=param_dtype, rngs=rngs)
        self.w_in = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype))
        self.w_gate = (nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype))
                       if activation == "swiglu" else None)
        self.w_out = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or len(x.shape) == 0:
            raise TypeError(f"pit_jax.nn.MoE: x must be an array [..., d_model={self.d_model}], got "
                            f"{'a 0-d array' if hasattr(x, 'shape') else type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):  # the output has x's dtype: ints would truncate it
            raise TypeError(f"pit_jax.nn.MoE: x must be a floating-point array, got {x.dtype}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"pit_jax.nn.MoE: x's last dim must be d_model={self.d_model}, got shape {x.shape}")
        tokens = x.reshape(-1, self.d_model)
        if tokens.shape[0] == 0:  # no tokens: nothing routed, no loss (a mean over none would be NaN)
            if self.capacity_factor is not None:
                self.sow(nnx.Intermediate, "dropped_fraction", jnp.zeros((), jnp.float32))
            self.sow(nnx.Intermediate, "load_balancing_loss", jnp.zeros((), jnp.float32))
            self.sow(nnx.Intermediate, "router_z_loss", jnp.zeros((), jnp.float32))
            return jnp.zeros(x.shape, x.dtype)
        logits = self.router(tokens.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_e = jax.lax.top_k(probs, self.top_k)
        top_prob = top_p[:, 0]  # each token's highest router probability (before renormalising)
        if self.renormalize:
            top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        routed = top_e
        if self.capacity_factor is not None:  # drop over-capacity assignments, Switch-style
            routed, dropped = drop_over_capacity(top_e, self.num_experts, self.capacity_factor,
                                                 priority=top_prob if self.batch_prioritized_routing else None)
            self.sow(nnx.Intermediate, "dropped_fraction", dropped / top_e.size)
        y = moe_ffn(tokens.astype(self.dtype), routed, top_p, self._weights(), self.activation)
        assigned = jnp.zeros(self.num_experts, jnp.float32).at[top_e.reshape(-1)].add(1.0)
        # per assignment (Switch: 1.0 when balanced) or per token (the sum over the k choices)
        fraction = assigned / (top_e.size if self.load_balancing == "switch" else top_e.shape[0])
        self.sow(nnx.Intermediate, "load_balancing_loss",
                 self.num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0)))
        self.sow(nnx.Intermediate, "router_z_loss",
                 jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2))
        return y.reshape(x.shape).astype(x.dtype)


    def _weights(self):
        cast = lambda p: None if p is None else p[...].astype(self.dtype)
        return cast(self.w_in), cast(self.w_gate), cast(self.w_out)


def moe_ffn(tokens, expert_ids, combine_weights, weights, activation, routing=None):
    """y[t] = Σ_s combine_weights[t, s] · FFN_{expert_ids[t, s]}(tokens[t]), the k-sum in fp32.
    `routing` (pit_jax.moe_routing(expert_ids, E)) is built here when not given.

    The hidden activations stay in routing order ([T·k, f], each expert's rows contiguous): the
    up-projections gather token rows (SRead) and write contiguous rows, the down-projection
    reads contiguous rows and scatters to (token, slot) rows (SWrite), and every backward
    pass has one contiguous operand. Both projections carry fused epilogues
    (`pit_jax.moe.fused_matmul`): the activation (relu, gelu, or swiglu's gate and up
    projections as one GEMM) after the up-projection, each row's combine weight after the
    down-projection, so the k rows of a token are only summed (no atomics: a reduction over
    [T, k, d]). They run as single kernels on the Hopper path when not differentiated
    (epilogue on the fp32 accumulators, rounded once); under grad/jvp the matmuls run unfused
    (products rounded to the input dtype first), so the two forwards may differ in the last
    bit of a bf16 value."""
    w_in, w_gate, w_out = weights
    t, k = expert_ids.shape
    # one routing index for all matmuls, forward and backward (built here when not given)
    _, _, routing = checked_operands(tokens, w_in, expert_ids, routing)
    if activation == "swiglu":  # [T·k, f], routing order
        h = fused_matmul(tokens, w_gate, routing, epilogue="swiglu", rows_per_source=k, x_sorted=False,
                         out_sorted=True, w_up=w_in)
    else:
        h = fused_matmul(tokens, w_in, routing, epilogue=activation, rows_per_source=k, x_sorted=False,
                         out_sorted=True)
    out = fused_matmul(h, w_out, routing, epilogue="scale", rows_per_source=1, x_sorted=True, out_sorted=False,
                       scale=combine_weights.reshape(-1))  # [T·k, d], weighted rows in (token, slot) order
    return out.reshape(t, k, out.shape[-1]).astype(jnp.float32).sum(axis=1).astype(tokens.dtype)


def MoELinen(**kwargs):
    """The same layer as a Linen module (flax's nnx->linen bridge); MoE's arguments, no rngs."""
    from flax.nnx import bridge
    return bridge.to_linen(MoE, **kwargs)
