"""A Python model of the MoE forward's tail split (cuda/moe/moe_tiles.cuh, moe_tail_tile, on
branch next/moe-tail-split): for tile counts and SM counts, every tile's columns are covered
exactly once by the CTAs of a grid of (bound + sms) blocks, whole tiles come first and no more
than one wave of pieces follows them. Run: python tail_split_model.py"""


def moe_tail_tile(block, tiles, sms, max_split):  # mirrors the CUDA function line by line
    full = tiles // sms * sms
    rest = tiles - full
    fit = sms // rest if rest > 0 else 1
    pieces = 4 if fit >= 4 and max_split >= 4 else (2 if fit >= 2 and max_split >= 2 else 1)
    if block < full or pieces == 1:
        return None if block >= tiles else (block, 0, 1)
    v = block - full
    if v >= rest * pieces:
        return None
    return (full + v // pieces, v % pieces, pieces)


def check(tiles, sms, max_split, out_cols):
    cover = {}
    grid = tiles + sms  # the launcher's grid is the bound of tiles (>= tiles) plus one wave
    pieces_cta = 0
    for b in range(grid):
        t = moe_tail_tile(b, tiles, sms, max_split)
        if t is None:
            continue
        tile, piece, pieces = t
        assert out_cols % pieces == 0 and (out_cols // pieces) % 64 == 0
        width = out_cols // pieces
        for c in range(piece * width, (piece + 1) * width):
            cover[(tile, c)] = cover.get((tile, c), 0) + 1
        pieces_cta += pieces > 1
    assert set(cover) == {(t, c) for t in range(tiles) for c in range(out_cols)}, (tiles, sms)
    assert all(n == 1 for n in cover.values()), (tiles, sms)
    assert pieces_cta <= sms


if __name__ == "__main__":
    n = 0
    for sms in (1, 2, 3, 7, 78, 114, 132, 144):
        for tiles in list(range(0, 3 * sms + 5)) + [558, 606, 1116, 1488, 3808]:
            check(tiles, sms, 4, 256)   # plain: 4 atoms of 64 columns
            check(tiles, sms, 2, 128)   # SwiGLU: 128 output columns, at most 2 pieces
            check(tiles, sms, 1, 256)   # the dx pass: never split
            n += 3
    print(f"ok: {n} (tiles, sms, split) cases, every column of every tile covered once")
    for tiles in (558, 606, 1116, 1488, 384, 3808):
        print(tiles, "tiles on 132 SMs:", [moe_tail_tile(b, tiles, 132, 4) for b in (tiles // 132 * 132,)])
