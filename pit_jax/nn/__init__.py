"""Flax modules built on pit_jax's rules."""
from .linear import PrunedLinear, PrunedLinearLinen, SparseLinear, SparseLinearLinen
from .moe import MoE, MoELinen

__all__ = ["MoE", "MoELinen", "SparseLinear", "SparseLinearLinen", "PrunedLinear", "PrunedLinearLinen"]
