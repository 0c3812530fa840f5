# Python model of the tall-tile forward's work split (next_moe_tall_tiles.patch): grid -> (row tile, col tile)
# -> (group, first, rows), checked to cover every (row, column) of out exactly once over random routings.
import numpy as np
BM, BN = 256, 128
def grid_tile(block, row_tiles, col_tiles, band):
    band_blocks = row_tiles * band; b = block // band_blocks; r = block % band_blocks
    width = min(band, col_tiles - b * band)
    return r // width, b * band + r % width
def find(group_starts, E, tile):
    n = [(group_starts[g+1]-group_starts[g]+BM-1)//BM for g in range(E+1)]
    excl = np.concatenate([[0], np.cumsum(n)[:-1]]); total = sum(n)
    if tile >= total: return None
    for g in range(E+1):
        if excl[g] <= tile < excl[g] + n[g]:
            first = group_starts[g] + (tile-excl[g])*BM
            return g, first, min(BM, group_starts[g+1]-first)
rng = np.random.default_rng(0)
for trial in range(300):
    E = int(rng.integers(1, 40)); A = int(rng.integers(0, 3000)); f = int(rng.integers(8, 700)) // 8 * 8 or 8
    swiglu = bool(rng.integers(0, 2))
    ids = rng.integers(0, E + 1, A)  # E = invalid group
    counts = np.bincount(ids, minlength=E+1)
    gs = np.concatenate([[0], np.cumsum(counts)])
    out_cols = BN // 2 if swiglu else BN
    col_tiles = -(-f // out_cols)
    row_tiles = -(-A // BM) + E + 1
    band = int(rng.integers(1, col_tiles + 1)) if rng.integers(0, 2) else col_tiles
    cover = np.zeros((A, f), int)
    for block in range(row_tiles * col_tiles):
        rt, ct = grid_tile(block, row_tiles, col_tiles, band)
        assert rt < row_tiles and ct < col_tiles
        t = find(gs, E, rt)
        if t is None: continue
        g, first, rows = t
        assert 0 < rows <= BM and gs[g] <= first and first + rows <= gs[g+1]
        n0 = ct * out_cols; cols = min(out_cols, f - n0)
        cover[first:first+rows, n0:n0+cols] += 1
    assert (cover == 1).all(), (trial, E, A, f)
print("ok: every (row, column) once in 300 random routings")
