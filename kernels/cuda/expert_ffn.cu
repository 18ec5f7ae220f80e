// Grouped "skinny" expert FFN in bf16 for few rows per expert (decode): every active expert of a
// layer in one launch per projection, bound by reading each expert's weights once.
//
// The weight rows are the MMA's M dimension (16 rows per m-tile, two m-tiles per block), the
// expert's token rows its N dimension (n-tiles of 8 tokens, NT of them: up to 8 * NT rows), K the
// reduction. mma.m16n8k16 sums over K in any order, so the K index of both operands is permuted
// alike: lane (g = lane / 4, q = lane % 4) loads 16 contiguous bytes (8 bf16) of weight rows g and
// g + 8 and of token row g at k = 32 c + 8 q, and uses its words 0, 1 as the fragment's k = 2q and
// 2q + 8 of one mma and words 2, 3 of the next. Both operands come straight from global memory in
// 16-byte loads (the weights streamed past L1, the tokens through L1/L2 where they are reused);
// no shared memory in the main loop. The 8 warps of a block split K (32-wide chunks, interleaved)
// and reduce through shared memory at the end.
//
// gate_up (MODE 0): the block's m-tiles are gate rows f0 .. f0 + 16 and up rows I + f0 ..; it
// writes act[row, f] = silu(gate) * up (f32 until the bf16 store). down (MODE 1): m-tiles are rows
// f0 .. f0 + 32 of W_down; it writes y[row, f].
//
// Requirements (checked by the launcher): K % 8 == 0, weight and token rows 16-byte aligned.

#define SK_GROUP 32
#define SK_WARPS 8
#define SK_THREADS (SK_WARPS * 32)

// One launch's experts: blockIdx.y = entry; rows <= 8 * NT (entries past the group have rows 0).
struct SkinnyGroup {
    u64 w[SK_GROUP];
    int row0[SK_GROUP];
    int rows[SK_GROUP];
};

__device__ __forceinline__ uint4 sk_ld_stream(const bf16* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 sk_ld_x(const bf16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void sk_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int MODE, int NT>
__device__ __forceinline__ void skinny_impl(const SkinnyGroup& g, const bf16* __restrict__ x, int K, int n_out,
                                            bf16* __restrict__ out) {
    constexpr int U = NT >= 4 ? 2 : 4;  // chunks in flight per warp
    __shared__ float red[SK_WARPS][16][NT * 8];
    const int e = blockIdx.y;
    const int rows = g.rows[e];
    if (rows <= 0) return;
    const int row0 = g.row0[e];
    const bf16* W = reinterpret_cast<const bf16*>(g.w[e]);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const int f0 = blockIdx.x * (MODE == 0 ? 16 : 32);

    const bf16* wrow[4];
    bool wok[4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int f = MODE == 0 ? f0 + gq + 8 * h : f0 + 16 * m + gq + 8 * h;
            const bool ok = f < n_out;
            const long long r = MODE == 0 ? (m ? (long long)n_out + f : f) : f;
            wrow[2 * m + h] = W + (ok ? r : 0) * K;
            wok[2 * m + h] = ok;
        }
    }
    const bf16* xrow[NT];
    bool xok[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int tok = j * 8 + gq;
        xok[j] = tok < rows;
        xrow[j] = x + (long long)(row0 + (xok[j] ? tok : 0)) * K;
    }
    const int ntiles = min(NT, (rows + 7) >> 3);
    float acc[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][j][i] = 0.0f;

    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int nchunk = (K + 31) >> 5;
    for (int c0 = warp; c0 < nchunk; c0 += SK_WARPS * U) {
        uint4 a[U][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * SK_WARPS;
            const int k = c * 32 + tq * 8;
            const bool kok = c < nchunk && k < K;
#pragma unroll
            for (int r = 0; r < 4; ++r) a[u][r] = (kok && wok[r]) ? sk_ld_stream(wrow[r] + k) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * SK_WARPS;
            if (c >= nchunk) break;  // warp-uniform
            const int k = c * 32 + tq * 8;
            const bool kok = k < K;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                if (j < ntiles) {  // warp-uniform
                    const uint4 b = (kok && xok[j]) ? sk_ld_x(xrow[j] + k) : zero;
                    sk_mma(acc[0][j], a[u][0].x, a[u][1].x, a[u][0].y, a[u][1].y, b.x, b.y);
                    sk_mma(acc[0][j], a[u][0].z, a[u][1].z, a[u][0].w, a[u][1].w, b.z, b.w);
                    sk_mma(acc[1][j], a[u][2].x, a[u][3].x, a[u][2].y, a[u][3].y, b.x, b.y);
                    sk_mma(acc[1][j], a[u][2].z, a[u][3].z, a[u][2].w, a[u][3].w, b.z, b.w);
                }
            }
        }
    }

    // Split-K reduction, one m-tile at a time. Output o = f + 16 * n (f the row in the m-tile,
    // n the token), handled by thread o % SK_THREADS.
    constexpr int OUTS = 16 * NT * 8;
    constexpr int PER = (OUTS + SK_THREADS - 1) / SK_THREADS;
    float first[PER];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int n = j * 8 + 2 * tq;
            red[warp][gq][n] = acc[m][j][0];
            red[warp][gq][n + 1] = acc[m][j][1];
            red[warp][gq + 8][n] = acc[m][j][2];
            red[warp][gq + 8][n + 1] = acc[m][j][3];
        }
        __syncthreads();
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int o = tid + p * SK_THREADS;
            const int f = o & 15, n = o >> 4;
            float s = 0.0f;
            if (o < OUTS) {
#pragma unroll
                for (int w = 0; w < SK_WARPS; ++w) s += red[w][f][n];
            }
            if (MODE == 0) {
                if (m == 0) {
                    first[p] = s;
                } else if (o < OUTS && n < rows && f0 + f < n_out) {
                    out[(long long)(row0 + n) * n_out + f0 + f] = from_f32<bf16>(silu_f32(first[p]) * s);
                }
            } else if (o < OUTS && n < rows && f0 + 16 * m + f < n_out) {
                out[(long long)(row0 + n) * n_out + f0 + 16 * m + f] = from_f32<bf16>(s);
            }
        }
        __syncthreads();
    }
}

// act[row0_e + n, :] = silu(x W_gate^T) * (x W_up^T) over each entry's rows; W = [2 * inter, hidden].
#define SK_GATE_UP(NT) \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) expert_skinny_gate_up_n##NT( \
        const SkinnyGroup g, const bf16* x, int hidden, int inter, bf16* act) { \
        skinny_impl<0, NT>(g, x, hidden, inter, act); }
// y[row0_e + n, :] = act W_down^T over each entry's rows; W = [hidden, inter].
#define SK_DOWN(NT) \
    extern "C" __global__ void __launch_bounds__(SK_THREADS) expert_skinny_down_n##NT( \
        const SkinnyGroup g, const bf16* act, int inter, int hidden, bf16* y) { \
        skinny_impl<1, NT>(g, act, inter, hidden, y); }
SK_GATE_UP(1)
SK_GATE_UP(2)
SK_DOWN(1)
SK_DOWN(2)
