// Attention: causal prefill over contiguous keys, attention over a paged KV cache, and the KV write.
//
// Paged KV cache (one per layer, K and V separately): [num_blocks, block_size, n_kv_heads, head_dim].
// Token slot s = block * block_size + offset. A sequence's block table row lists its blocks in order.
//
// One block of ATTN_WARPS warps per (query token, query head). Each warp walks a strided subset of
// the keys with an online softmax (f32); lane l holds dimensions l, l + 32, ... of the head; the
// warps' partial states are merged at the end (lanes past head_dim idle). head_dim: 1 .. 32 * ATTN_MAX_PER_LANE.
//
// window > 0 is a sliding window (Mixtral's sliding_window): the query at key position p sees keys
// p - window < j <= p, itself and the window - 1 before it; 0 means every key up to its own.

#define ATTN_WARPS 4
#define ATTN_MAX_PER_LANE 8

template <typename T>
struct ContiguousKv {
    const T* k;
    const T* v;
    long long stride;  // elements between tokens
    int head_off;      // kv_head * head_dim
    __device__ __forceinline__ const T* key(int j) const { return k + j * stride + head_off; }
    __device__ __forceinline__ const T* value(int j) const { return v + j * stride + head_off; }
    __device__ __forceinline__ bool valid(int) const { return true; }
};

template <typename T>
struct PagedKv {
    const T* k_cache;
    const T* v_cache;
    const int* blocks;  // this sequence's block table row
    int block_size;
    int num_blocks;
    int n_kv;
    int head_dim;
    int kv_head;
    __device__ __forceinline__ long long offset(int j) const {
        const int b = blocks[j / block_size];
        return (((long long)b * block_size + j % block_size) * n_kv + kv_head) * head_dim;
    }
    __device__ __forceinline__ bool valid(int j) const {
        const int b = blocks[j / block_size];
        return b >= 0 && b < num_blocks;
    }
    __device__ __forceinline__ const T* key(int j) const { return k_cache + offset(j); }
    __device__ __forceinline__ const T* value(int j) const { return v_cache + offset(j); }
};

// out[0 .. head_dim) = softmax(scale * q . k_j) v_j over keys j in [first, n_keys), first =
// max(0, n_keys - window) with a window (> 0), else 0; keys the source reports invalid are skipped.
// No keys: zeros.
template <typename T, typename Kv>
__device__ void attend(const T* q, const Kv& kv, int n_keys, int window, int head_dim, float scale, T* out) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][32 * ATTN_MAX_PER_LANE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float qv[ATTN_MAX_PER_LANE], acc[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PER_LANE; ++i) {
        qv[i] = lane + 32 * i < head_dim ? to_f32(q[lane + 32 * i]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int first = window > 0 ? max(0, n_keys - window) : 0;
    for (int j = first + warp; j < n_keys; j += ATTN_WARPS) {
        if (!kv.valid(j)) continue;
        const T* kp = kv.key(j);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_PER_LANE; ++i)
            if (lane + 32 * i < head_dim) s += qv[i] * to_f32(kp[lane + 32 * i]);
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
        const T* vp = kv.value(j);
#pragma unroll
        for (int i = 0; i < ATTN_MAX_PER_LANE; ++i)
            if (lane + 32 * i < head_dim) acc[i] = acc[i] * corr + p * to_f32(vp[lane + 32 * i]);
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PER_LANE; ++i)
        if (lane + 32 * i < head_dim) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) m_all = fmaxf(m_all, s_m[w]);
    float l_all = 0.0f, f[ATTN_WARPS];
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) {
        f[w] = s_l[w] > 0.0f ? expf(s_m[w] - m_all) : 0.0f;
        l_all += s_l[w] * f[w];
    }
    const float inv = l_all > 0.0f ? 1.0f / l_all : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) o += s_acc[w][d] * f[w];
        out[d] = from_f32<T>(o * inv);
    }
}

// Causal attention within each sequence of a packed batch (no cache): sequence b owns tokens
// cu_seqlens[b] .. cu_seqlens[b + 1]; token t attends to the tokens of its sequence up to itself
// (the last `window` of them when window > 0; positions count from the sequence's first token).
// q: [n_tokens, q_stride] with head h at column h * head_dim; k, v: [n_tokens, kv_stride] with kv
// head g at column g * head_dim; out: [n_tokens, n_heads * head_dim]. Query head h reads kv head
// h / (n_heads / n_kv). grid: (n_tokens, n_heads), block: 32 * ATTN_WARPS.
template <typename T>
__device__ void attention_prefill_impl(const T* q, int q_stride, const T* k, const T* v, int kv_stride, T* out,
                                       const int* cu_seqlens, int n_seqs, int n_tokens, int n_heads, int n_kv,
                                       int head_dim, float scale, int window) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tokens || h >= n_heads) return;
    int lo = 0, hi = n_seqs;  // last b with cu_seqlens[b] <= t
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    int start = cu_seqlens[lo];
    if (start < 0 || start > t) start = t;  // a malformed cu_seqlens degrades, never reads out of bounds
    const int kvh = h / (n_heads / n_kv);
    ContiguousKv<T> kv{k + (long long)start * kv_stride, v + (long long)start * kv_stride, kv_stride, kvh * head_dim};
    attend<T>(q + (long long)t * q_stride + h * head_dim, kv, t - start + 1, window, head_dim, scale,
              out + ((long long)t * n_heads + h) * head_dim);
}
#define ATTN_PREFILL(S, T) \
    extern "C" __global__ void attention_prefill_##S(const T* q, int q_stride, const T* k, const T* v, int kv_stride, T* out, \
        const int* cu_seqlens, int n_seqs, int n_tokens, int n_heads, int n_kv, int head_dim, float scale, int window) { \
        attention_prefill_impl<T>(q, q_stride, k, v, kv_stride, out, cu_seqlens, n_seqs, n_tokens, n_heads, n_kv, head_dim, scale, \
                                  window); }
PG_DTYPES(ATTN_PREFILL)

// Attention of each query token over its sequence's paged KV cache (decode, chunked prefill, or
// both mixed): token t uses block table row seq_rows[t] and attends to cache positions
// 0 ..= positions[t] (positions[t] - window < j with window > 0; its own K/V must already be written). Blocks outside 0..num_blocks are
// skipped; a row outside 0..n_rows or a negative position gives a zero output.
// q: [n_tokens, q_stride]; block_tables: [rows, max_blocks]; out: [n_tokens, n_heads * head_dim].
// grid: (n_tokens, n_heads), block: 32 * ATTN_WARPS.
template <typename T>
__device__ void attention_paged_impl(const T* q, int q_stride, const T* k_cache, const T* v_cache,
                                     const int* block_tables, int n_rows, int max_blocks, const int* seq_rows,
                                     const int* positions, T* out, int n_tokens, int n_heads, int n_kv, int head_dim, int block_size,
                                     int num_blocks, float scale, int window) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tokens || h >= n_heads) return;
    const int row = seq_rows[t];
    const bool row_ok = row >= 0 && row < n_rows;
    const int n_keys = row_ok ? max(0, min(positions[t] + 1, max_blocks * block_size)) : 0;
    PagedKv<T> kv{k_cache, v_cache, block_tables + (long long)(row_ok ? row : 0) * max_blocks, block_size, num_blocks,
                  n_kv, head_dim, h / (n_heads / n_kv)};
    attend<T>(q + (long long)t * q_stride + h * head_dim, kv, n_keys, window, head_dim, scale,
              out + ((long long)t * n_heads + h) * head_dim);
}
#define ATTN_PAGED(S, T) \
    extern "C" __global__ void attention_paged_##S(const T* q, int q_stride, const T* k_cache, const T* v_cache, \
        const int* block_tables, int n_rows, int max_blocks, const int* seq_rows, const int* positions, T* out, \
        int n_tokens, int n_heads, int n_kv, int head_dim, int block_size, int num_blocks, float scale, int window) { \
        attention_paged_impl<T>(q, q_stride, k_cache, v_cache, block_tables, n_rows, max_blocks, seq_rows, positions, out, \
                                n_tokens, n_heads, n_kv, head_dim, block_size, num_blocks, scale, window); }
PG_DTYPES(ATTN_PAGED)

// Writes token t's keys and values (k, v: [n_tokens, kv_stride], n_kv * head_dim used) into cache
// slot slots[t]; a slot outside 0 .. num_slots is skipped (padding). grid: n_tokens blocks.
template <typename T>
__device__ void kv_cache_write_impl(const T* k, const T* v, int kv_stride, T* k_cache, T* v_cache, const int* slots,
                                    int n_tokens, int width, long long num_slots) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int s = slots[t];
    if (s < 0 || s >= num_slots) return;
    const T* ks = k + (long long)t * kv_stride;
    const T* vs = v + (long long)t * kv_stride;
    T* kd = k_cache + (long long)s * width;
    T* vd = v_cache + (long long)s * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        kd[c] = ks[c];
        vd[c] = vs[c];
    }
}
#define KV_WRITE(S, T) \
    extern "C" __global__ void kv_cache_write_##S(const T* k, const T* v, int kv_stride, T* k_cache, T* v_cache, \
        const int* slots, int n_tokens, int width, long long num_slots) { \
        kv_cache_write_impl<T>(k, v, kv_stride, k_cache, v_cache, slots, n_tokens, width, num_slots); }
PG_DTYPES(KV_WRITE)
