// dW on the packed x in two passes, for very sparse x (bf16/fp16; the "products" path of
// PIT_KGATHER_DW=sparse). Included by kgather_cuda.cu.
//
// dW = Σ_g P_gᵀ dy_g, with P_g the packed x of 32-row group g (pack's output: its listed columns,
// ascending) and dy_g its 32 rows of dy.
//   1. offsets: an exclusive scan of the groups' packed lengths gives each (group, listed column)
//      a row of an fp32 scratch buffer.
//   2. products: one CTA per (group, 128 columns of dy) holds dy_g's tile in shared memory and
//      writes P_gᵀ dy_g (tensor cores, fp32) into the group's scratch rows. dy is read once.
//   3. table: a [K, groups] table names, for each column k of x and each group, the scratch row
//      of (group, k), or -1 (cleared first, then one write per listed pair; no atomics).
//   4. reduce: one warp per dW row k reads its table row, and sums the scratch rows it names in
//      group order (deterministic, no atomics); rows no group lists are written as zeros.
// The scratch holds at most `cap_rows` rows of `n_slab` columns; wider dy runs as several slabs.
// When the index lists more than cap_rows columns over all groups, every kernel after the offsets
// (pack included) returns at once and the masked dW kernel, or pit_dense_tn_gated's dense GEMM,
// which read the same total, computes dW instead: the choice is made on the device, with no host
// synchronisation.
#pragma once

namespace pit {
namespace {

constexpr int kProductsCols = 64;        // packed columns per chunk: 4 warps x 16
constexpr int kProductsN = 128;          // dy / scratch columns per products CTA
constexpr int kProductsThreads = 128;
constexpr int kReduceRowsPerCta = 8;     // one warp per dW row
constexpr int kReduceMaxRounds = 32;     // a reduce warp keeps 32 groups' hits per round in registers
constexpr int64_t kProductsMaxGroups = 32 * kReduceMaxRounds;
constexpr int kOffsetsThreads = 1024;

// Scratch layout after the masked kernel's masks: packed x | column ids | offsets | table | products.
inline int64_t pad256(int64_t bytes) { return ceil_div(bytes, int64_t(256)) * 256; }
inline int64_t products_offsets_bytes(const KGatherShape& s) { return pad256((s.all_groups() + 1) * 4); }
inline int64_t products_table_bytes(const KGatherShape& s) { return pad256(s.k * s.all_groups() * 4); }
inline int64_t products_workspace_bytes(const KGatherShape& s, int64_t elem, int64_t cap_rows, int64_t n_slab) {
  return pad256(s.tn_workspace_bytes()) + pad256(s.forward_workspace_bytes(elem)) + products_offsets_bytes(s) +
         products_table_bytes(s) + cap_rows * n_slab * 4;
}

// Before pass 3: every table entry -1 (not listed), in 16-byte stores (the table's section is
// 256-byte aligned) and the last k·groups % 4 entries one by one. Grid-stride.
__global__ void __launch_bounds__(256) pit_kgather_products_table_clear_kernel(
    const int32_t* __restrict__ offsets, int32_t* __restrict__ table, KGatherShape s, int64_t cap_rows) {
  const int64_t entries = s.k * s.all_groups();
  if (offsets[s.all_groups()] > cap_rows) return;  // the path does not run
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int4* vecs = reinterpret_cast<int4*>(table);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < entries / 4; i += stride)
    vecs[i] = make_int4(-1, -1, -1, -1);
  if (blockIdx.x == 0 && threadIdx.x < entries % 4) table[entries / 4 * 4 + threadIdx.x] = -1;
}

// Pass 3: table[k][g] = the scratch row of (group g, column k) for each listed pair (the table
// was set to -1 before). One CTA per group.
__global__ void __launch_bounds__(256) pit_kgather_products_table_kernel(
    const int32_t* __restrict__ column_ids, const int32_t* __restrict__ offsets, int32_t* __restrict__ table,
    KGatherShape s, int64_t cap_rows) {
  const int64_t groups = s.all_groups();
  if (offsets[groups] > cap_rows) return;  // the masked kernel computes dW
  const int64_t g = blockIdx.x;
  const int first = offsets[g], len = offsets[g + 1] - first;
  for (int p = threadIdx.x; p < len; p += blockDim.x) {
    const int32_t k = column_ids[g * s.packed_k + p];
    if (k >= 0) table[int64_t(k) * groups + g] = first + p;
  }
}

// offsets[g] = Σ_{g' < g} packed length of g' (counts × tile_k), offsets[G] = the total. One CTA.
__global__ void __launch_bounds__(kOffsetsThreads) pit_kgather_group_offsets_kernel(
    const int32_t* __restrict__ counts, int32_t* __restrict__ offsets, KGatherShape s) {
  using Scan = cub::BlockScan<int, kOffsetsThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t groups = s.all_groups();
  int carry = 0;
  for (int64_t base = 0; base < groups; base += kOffsetsThreads) {
    const int64_t grp = base + threadIdx.x;
    const int len = grp < groups ? int(s.group_length(counts, grp / s.groups, grp % s.groups)) : 0;
    int pos, total;
    Scan(storage).ExclusiveSum(len, pos, total);
    if (grp < groups) offsets[grp] = carry + pos;
    carry += total;
    __syncthreads();  // the scan's storage is reused
  }
  if (threadIdx.x == 0) offsets[groups] = carry;
}

// Pass 2: scratch[offsets[g] + p][c] = Σ_r P_g[r][p] · dy_g[r][n0 + c] for p < the group's length,
// c in this CTA's 128 columns of the slab [n0, n0 + width).
template <typename T>
__global__ void __launch_bounds__(kProductsThreads) pit_kgather_tn_products_kernel(
    const T* __restrict__ packed, const int32_t* __restrict__ offsets, const T* __restrict__ dy,
    float* __restrict__ scratch, KGatherShape s, int64_t n0, int64_t n_slab, int64_t width, int64_t cap_rows,
    bool vec_dy) {
  constexpr int kDStride = kProductsN + 8, kPStride = kProductsCols + 8;  // 16-byte padding: ldmatrix rows
  __shared__ __align__(16) T dys[kGroupRows * kDStride];
  __shared__ __align__(16) T ps[kGroupRows * kPStride];
  if (offsets[s.all_groups()] > cap_rows) return;  // the masked kernel computes dW
  const int64_t group = blockIdx.x;
  const int64_t first_row = offsets[group];
  const int len = offsets[group + 1] - int(first_row);
  if (len == 0) return;
  const int64_t b = group / s.groups, row0 = (group % s.groups) * kGroupRows;
  const int64_t c0 = int64_t(blockIdx.y) * kProductsN;  // within the slab
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;

  // This thread's vectors of a P chunk, loaded into registers first so that chunk 0's loads are in
  // flight together with dy's. Columns from len on are multiplied but never stored. Pack wrote zeros
  // up to len's multiple of 32 and nothing after it, so vectors starting at or past len are not read.
  constexpr int kPVecs = kGroupRows * (kProductsCols / 8) / kProductsThreads;
  uint4 pv[kPVecs];
  auto load_p = [&](int p0) {
#pragma unroll
    for (int j = 0; j < kPVecs; ++j) {
      const int i = threadIdx.x + j * kProductsThreads;
      const int r = i / (kProductsCols / 8), c = (i % (kProductsCols / 8)) * 8;
      pv[j] = p0 + c < len ? *reinterpret_cast<const uint4*>(packed + (group * kGroupRows + r) * s.packed_k + p0 + c)
                           : make_uint4(0, 0, 0, 0);
    }
  };
  auto store_p = [&]() {
#pragma unroll
    for (int j = 0; j < kPVecs; ++j) {
      const int i = threadIdx.x + j * kProductsThreads;
      const int r = i / (kProductsCols / 8), c = (i % (kProductsCols / 8)) * 8;
      *reinterpret_cast<uint4*>(ps + r * kPStride + c) = pv[j];
    }
  };
  load_p(0);
  for (int i = threadIdx.x; i < kGroupRows * (kProductsN / 8); i += kProductsThreads) {
    const int r = i / (kProductsN / 8), c = (i % (kProductsN / 8)) * 8;
    const int64_t row = row0 + r, col = c0 + c;  // col within the slab
    T* dst = dys + r * kDStride + c;
    if (row < s.rows && vec_dy && col + 8 <= width) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(dy + (b * s.rows + row) * s.n + n0 + col);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        dst[e] = (row < s.rows && col + e < width) ? dy[(b * s.rows + row) * s.n + n0 + col + e] : zero_value<T>();
    }
  }
  for (int p0 = 0; p0 < len; p0 += kProductsCols) {
    if (p0 > 0) {
      __syncthreads();  // the previous chunk is read
      load_p(p0);
    }
    store_p();
    __syncthreads();  // dy's tile (first chunk) and this chunk are written
    const int m0 = p0 + warp * 16;  // this warp's 16 packed columns (MMA rows)
    if (m0 >= len) continue;
    uint32_t a[2][4];  // Pᵀ: rows = packed columns, reduction = the group's 32 rows
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
      ldmatrix_x4_trans(a[ks], ps + (ks * 16 + lane % 8 + (lane / 16) * 8) * kPStride + warp * 16 + ((lane / 8) % 2) * 8);
    const int p_lo = m0 + gq, p_hi = p_lo + 8;
    float* out_lo = scratch + (first_row + p_lo) * n_slab + c0 + 2 * tq;
    float* out_hi = out_lo + 8 * n_slab;
#pragma unroll 4
    for (int nt = 0; nt < kProductsN / 8; ++nt) {
      uint32_t bq[4];  // dy rows 0-7, 8-15, 16-23, 24-31 of columns nt*8 .. nt*8+7
      ldmatrix_x4_trans(bq, dys + lane * kDStride + nt * 8);
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      mma_16816<T>(d, a[0], bq[0], bq[1]);
      mma_16816<T>(d, a[1], bq[2], bq[3]);
      if (c0 + nt * 8 + 2 * tq < width) {  // (a pair never crosses a scratch row: n_slab % 128 == 0)
        if (p_lo < len) *reinterpret_cast<float2*>(out_lo + nt * 8) = make_float2(d[0], d[1]);
        if (p_hi < len) *reinterpret_cast<float2*>(out_hi + nt * 8) = make_float2(d[2], d[3]);
      }
    }
  }
}

// Pass 4: dw[k][n0 + c] = Σ over the groups g listing column k, in order of g, of the scratch row
// table[k][g]; zero where no group lists k. One warp per row; each lane keeps kReduceVecs float4
// sums, so a listed row's loads are all in flight at once.
constexpr int kReduceVecs = 8;  // 1024 columns per pass over a row
// Up to 128 groups (kRounds 4) the kernel fits 80 registers, 3 CTAs per SM; more rounds spill at that bound.
template <typename T, int kRounds>
__global__ void __launch_bounds__(32 * kReduceRowsPerCta, kRounds <= 4 ? 3 : 2) pit_kgather_tn_reduce_kernel(
    const int32_t* __restrict__ table, const int32_t* __restrict__ offsets, const float* __restrict__ scratch,
    T* __restrict__ dw, KGatherShape s, int64_t n0, int64_t n_slab, int64_t width, int64_t cap_rows, bool vec_dw) {
  const int64_t groups = s.all_groups();
  if (offsets[groups] > cap_rows) return;  // the masked kernel computes dW
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k = int64_t(blockIdx.x) * kReduceRowsPerCta + warp;
  if (k >= s.k) return;  // the whole warp
  const int32_t* table_row = table + k * groups;
  int hit[kRounds];  // kRounds * 32 >= groups (the launcher's choice: as few registers as the groups need)
#pragma unroll
  for (int j = 0; j < kRounds; ++j) {  // the loads of every round first
    const int64_t g = int64_t(j) * 32 + lane;
    hit[j] = g < groups ? table_row[g] : -1;
  }
  T* out = dw + k * s.n + n0;
  for (int64_t base = 0; base < width; base += 128 * kReduceVecs) {  // the same trip count in every lane
    float4 acc[kReduceVecs];
#pragma unroll
    for (int q = 0; q < kReduceVecs; ++q) acc[q] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < kRounds; ++j) {
      unsigned m = __ballot_sync(0xffffffffu, hit[j] >= 0);  // (-1 in every lane past the groups)
      while (m != 0) {
        const int l = __ffs(m) - 1;
        m &= m - 1;
        const int row = __shfl_sync(0xffffffffu, hit[j], l);
        const float* src = scratch + int64_t(row) * n_slab + base + lane * 4;
        float4 v[kReduceVecs];
#pragma unroll
        for (int q = 0; q < kReduceVecs; ++q)  // whole 128-column blocks of the row (n_slab % 128 == 0)
          if (base + q * 128 < width) v[q] = *reinterpret_cast<const float4*>(src + q * 128);
#pragma unroll
        for (int q = 0; q < kReduceVecs; ++q)
          if (base + q * 128 < width) {
            acc[q].x += v[q].x;
            acc[q].y += v[q].y;
            acc[q].z += v[q].z;
            acc[q].w += v[q].w;
          }
      }
    }
#pragma unroll
    for (int q = 0; q < kReduceVecs; ++q) {
      const int64_t c = base + q * 128 + lane * 4;
      if (c >= width) continue;
      if (vec_dw && c + 4 <= width) {
        alignas(8) T v[4] = {from_float<T>(acc[q].x), from_float<T>(acc[q].y), from_float<T>(acc[q].z),
                             from_float<T>(acc[q].w)};
        *reinterpret_cast<uint2*>(out + c) = *reinterpret_cast<const uint2*>(v);
      } else {
        const float a[4] = {acc[q].x, acc[q].y, acc[q].z, acc[q].w};
        for (int e = 0; e < 4 && c + e < width; ++e) out[c + e] = from_float<T>(a[e]);
      }
    }
  }
}

}  // namespace
}  // namespace pit
