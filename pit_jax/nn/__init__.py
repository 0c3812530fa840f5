"""Flax modules built on pit_jax's rules."""
from .moe import MoE, MoELinen

__all__ = ["MoE", "MoELinen"]
