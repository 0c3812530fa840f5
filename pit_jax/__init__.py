"""pit_jax: permutation-invariant dynamic sparsity (PIT) for JAX on NVIDIA GPUs.

Layers, each importing only those below: _ext (load + register FFI handlers) -> _primitive
(shared primitive helpers) -> one module per rule (detect, kgather, ...) -> public namespace.
"""
from ._ext import build_info, cuda_available
from .detect import detect
from .kgather import dense_sparse, sparse_dense
from .moe import MoeRouting, drop_over_capacity, moe_matmul, moe_routing
from .pruning import prune_tiles_by_magnitude, tile_magnitude_mask
from .tile_index import TileIndex, tile_index_from_mask

__all__ = ["detect", "sparse_dense", "dense_sparse", "moe_matmul", "moe_routing", "MoeRouting", "drop_over_capacity", "tile_magnitude_mask", "prune_tiles_by_magnitude", "TileIndex", "tile_index_from_mask", "build_info", "cuda_available"]
__version__ = "0.1.0"
