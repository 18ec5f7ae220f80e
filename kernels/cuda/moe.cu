// Routing and the token permutation around the expert FFN.
//
// A "pair" is (token t, choice j) with index p = t * k + j, for k experts per token.

#define MOE_MAX_EXPERTS 256
#define MOE_PERMUTE_THREADS 1024

// Per token: the k largest of logits[t, 0 .. n_experts) (ties: lower index first; NaN counts as
// -inf), written in descending order to ids[t, :], and weights[t, :] = softmax over those k
// logits (k = 1: weight exactly 1). grid-stride, one thread per token.
extern "C" __global__ void topk_softmax(const float* logits, int n_tokens, int n_experts, int k, int* ids, float* weights) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n_tokens; t += gridDim.x * blockDim.x) {
        const float* row = logits + (long long)t * n_experts;
        int chosen[8];
        float val[8];
        for (int j = 0; j < k; ++j) {
            int best = -1;
            float bv = -INFINITY;
            for (int e = 0; e < n_experts; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
                if (taken) continue;
                float v = row[e];
                if (isnan(v)) v = -INFINITY;
                if (best < 0 || v > bv) {
                    best = e;
                    bv = v;
                }
            }
            chosen[j] = best;
            val[j] = bv;
        }
        const float mx = val[0];
        float w[8], sum = 0.0f;
        for (int j = 0; j < k; ++j) {
            w[j] = mx == -INFINITY ? 1.0f : expf(val[j] - mx);
            sum += w[j];
        }
        for (int j = 0; j < k; ++j) {
            ids[(long long)t * k + j] = chosen[j];
            weights[(long long)t * k + j] = w[j] / sum;
        }
    }
}

// Sorts the pairs by expert, stably (ascending pair index within an expert):
// counts[e] = pairs routed to e; offsets[e] = sum of counts[0 .. e) (n_experts + 1 entries);
// sorted_pair[offsets[e] + r] = the r-th pair of expert e; pair_pos[p] = where pair p went.
// Pairs with an id outside 0 .. n_experts get pair_pos -1 and are left out (sorted_pair then has
// unwritten entries past offsets[n_experts]). One block of MOE_PERMUTE_THREADS threads.
extern "C" __global__ void __launch_bounds__(MOE_PERMUTE_THREADS) moe_permute(const int* ids, int n_pairs, int n_experts, int* counts, int* offsets,
                                       int* sorted_pair, int* pair_pos) {
    __shared__ int s_count[MOE_MAX_EXPERTS];
    __shared__ int s_base[MOE_MAX_EXPERTS];
    __shared__ int s_warp[MOE_PERMUTE_THREADS / 32][MOE_MAX_EXPERTS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    for (int e = tid; e < n_experts; e += blockDim.x) s_count[e] = 0;
    __syncthreads();
    for (int p = tid; p < n_pairs; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < n_experts) atomicAdd(&s_count[e], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int e = 0; e < n_experts; ++e) {
            s_base[e] = run;
            counts[e] = s_count[e];
            offsets[e] = run;
            run += s_count[e];
        }
        offsets[n_experts] = run;
    }
    __syncthreads();
    const unsigned lt_mask = (1u << lane) - 1u;
    for (int start = 0; start < n_pairs; start += blockDim.x) {
        for (int i = tid; i < nwarps * n_experts; i += blockDim.x) s_warp[i / n_experts][i % n_experts] = 0;
        __syncthreads();
        const int p = start + tid;
        int e = p < n_pairs ? ids[p] : -1;
        const bool ok = e >= 0 && e < n_experts;
        if (!ok) e = -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int rank_in_warp = __popc(same & lt_mask);
        if (ok && rank_in_warp == 0) s_warp[warp][e] = __popc(same);
        __syncthreads();
        if (ok) {
            int rank = rank_in_warp;
            for (int w = 0; w < warp; ++w) rank += s_warp[w][e];
            const int pos = s_base[e] + rank;
            sorted_pair[pos] = p;
            pair_pos[p] = pos;
        } else if (p < n_pairs) {
            pair_pos[p] = -1;
        }
        __syncthreads();
        for (int ex = tid; ex < n_experts; ex += blockDim.x) {
            int add = 0;
            for (int w = 0; w < nwarps; ++w) add += s_warp[w][ex];
            s_base[ex] += add;
        }
        __syncthreads();
    }
}

// x_perm[r, :] = x[sorted_pair[r] / k, :] for r < offsets[n_experts] (rows past it untouched);
// x has n_pairs / k rows.
// grid-stride over rows, one block per row.
template <typename T>
__device__ void moe_gather_impl(const T* x, const int* sorted_pair, const int* offsets, int n_experts, int n_pairs,
                                int k, int hidden, T* x_perm) {
    const int total = min(offsets[n_experts], n_pairs);
    for (int r = blockIdx.x; r < total; r += gridDim.x) {
        const int pair = sorted_pair[r];
        if (pair < 0 || pair >= n_pairs) continue;  // never read outside x
        const T* src = x + (long long)(pair / k) * hidden;
        T* dst = x_perm + (long long)r * hidden;
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
    }
}
#define MOE_GATHER(S, T) \
    extern "C" __global__ void moe_gather_##S(const T* x, const int* sorted_pair, const int* offsets, int n_experts, \
        int n_pairs, int k, int hidden, T* x_perm) { \
        moe_gather_impl<T>(x, sorted_pair, offsets, n_experts, n_pairs, k, hidden, x_perm); }
PG_DTYPES(MOE_GATHER)

// Un-permute with the weighted combine, in token order (deterministic, no atomics):
// out[t, :] = (accumulate ? out[t, :] : 0) + sum_j weights[t * k + j] * y_perm[pair_pos[t * k + j], :],
// pairs with pair_pos < 0 skipped; the sum in f32. grid: n_tokens blocks.
template <typename T>
__device__ void moe_combine_impl(const T* y_perm, const int* pair_pos, const float* weights, int n_tokens, int k,
                                 int hidden, int n_rows, T* out, int accumulate) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    T* dst = out + (long long)t * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = accumulate ? to_f32(dst[c]) : 0.0f;
        for (int j = 0; j < k; ++j) {
            const int pos = pair_pos[t * k + j];
            if (pos >= 0 && pos < n_rows) acc += weights[t * k + j] * to_f32(y_perm[(long long)pos * hidden + c]);
        }
        dst[c] = from_f32<T>(acc);
    }
}
#define MOE_COMBINE(S, T) \
    extern "C" __global__ void moe_combine_##S(const T* y_perm, const int* pair_pos, const float* weights, int n_tokens, \
        int k, int hidden, int n_rows, T* out, int accumulate) { \
        moe_combine_impl<T>(y_perm, pair_pos, weights, n_tokens, k, hidden, n_rows, out, accumulate); }
PG_DTYPES(MOE_COMBINE)
