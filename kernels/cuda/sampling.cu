// Token sampling, one block of SAMPLE_THREADS threads per row of logits [rows, vocab] (f32).
//
// Row b: temperature[b] <= 0 -> greedy argmax (lowest index on ties). Otherwise, with
// p_i proportional to exp((l_i - max) / temperature):
//   1. top_k[b] in 1 .. vocab-1 keeps the tokens whose logit is >= the k-th largest (ties at the
//      threshold all stay); otherwise every token stays;
//   2. top_p[b] < 1 keeps (top_p <= 0: greedy), among those, the tokens with p_i >= tau, tau the largest threshold whose
//      kept mass is still >= top_p of the top-k mass (the nucleus; ties at tau all stay);
//   3. u = uniform(seeds[b]) in [0, 1), u = (splitmix64(seed) >> 40) * 2^-24, and the token is the
//      first kept index (ascending) where the running kept mass exceeds u * (total kept mass).
// NaN logits count as -inf. The engine derives seeds[b] from the request's seed and position.

#define SAMPLE_THREADS 1024

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Float -> unsigned with the same order (every float, -inf included).
__device__ __forceinline__ unsigned ordered_key(float f) {
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float clean(float v) { return isnan(v) ? -INFINITY : v; }

// 1024 threads per block: cap the registers so the launch always fits.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_tokens(const float* logits, int rows, int vocab, const float* temperature,
                                         const int* top_k, const float* top_p, const u64* seeds, unsigned* out) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    __shared__ float s_incl[SAMPLE_THREADS];
    __shared__ int s_found;
    const int b = blockIdx.x;
    if (b >= rows) return;
    const float* row = logits + (long long)b * vocab;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

    // Argmax: (value, index) with the lowest index on ties.
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = clean(row[i]);
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { s_val[warp] = bv; s_idx[warp] = bi; }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < nwarps; ++w)
            if (s_val[w] > bv || (s_val[w] == bv && s_idx[w] < bi)) { bv = s_val[w]; bi = s_idx[w]; }
        s_val[0] = bv;
        s_idx[0] = bi;
    }
    __syncthreads();
    const float mx = s_val[0];
    const int argmax = s_idx[0];
    const float temp = temperature[b];
    if (!(temp > 0.0f) || mx == -INFINITY) {
        if (tid == 0) out[b] = (unsigned)(argmax < vocab ? argmax : 0);
        return;
    }
    const float inv_t = 1.0f / temp;

    // 1. top-k threshold: the largest key t with count(key >= t) >= k is the k-th largest key.
    const int kk = top_k[b];
    unsigned kth = 0;
    if (kk > 0 && kk < vocab) {
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned cand = kth | (1u << bit);
            int c = 0;
            for (int i = tid; i < vocab; i += blockDim.x) c += ordered_key(clean(row[i])) >= cand;
            if ((int)block_sum((float)c) >= kk) kth = cand;  // counts exact below 2^24
        }
    }
    // 2. weights and the nucleus threshold.
    float z = 0.0f;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float l = clean(row[i]);
        if (ordered_key(l) >= kth) z += expf((l - mx) * inv_t);
    }
    z = block_sum(z);
    const float pp = top_p[b];
    unsigned tau = 0;  // bits of a non-negative float: same order as the floats
    if (pp < 1.0f) {
        const float need = pp * z;
        for (int bit = 30; bit >= 0; --bit) {
            const unsigned cand = tau | (1u << bit);
            const float th = __uint_as_float(cand);
            float mass = 0.0f;
            for (int i = tid; i < vocab; i += blockDim.x) {
                const float l = clean(row[i]);
                const float e = ordered_key(l) >= kth ? expf((l - mx) * inv_t) : 0.0f;
                if (e >= th) mass += e;
            }
            if (block_sum(mass) >= need) tau = cand;
        }
    }
    const float tau_f = __uint_as_float(tau);
    // 3. inverse CDF in index order: thread tid owns a contiguous chunk of the vocabulary.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = min(tid * chunk, vocab), hi = min(lo + chunk, vocab);
    float local = 0.0f;
    int last_kept = -1;
    for (int i = lo; i < hi; ++i) {
        const float l = clean(row[i]);
        const float e = ordered_key(l) >= kth ? expf((l - mx) * inv_t) : 0.0f;
        if (e > 0.0f && e >= tau_f) { local += e; last_kept = i; }
    }
    // inclusive scan of `local` over threads
    float incl = local;
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) s_val[warp] = incl;
    if (tid == 0) s_found = -1;
    __syncthreads();
    if (warp == 0) {
        float w = lane < nwarps ? s_val[lane] : 0.0f;
        for (int o = 1; o < 32; o <<= 1) {
            const float n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        s_val[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    if (warp > 0) incl += s_val[warp - 1];
    s_incl[tid] = incl;
    __syncthreads();
    const float total = s_incl[blockDim.x - 1];
    const float u = (float)(splitmix64(seeds[b]) >> 40) * (1.0f / 16777216.0f);
    const float target = u * total;
    const float before = tid > 0 ? s_incl[tid - 1] : 0.0f;
    if (local > 0.0f && target >= before && target < incl) {
        float run = before;
        int pick = last_kept;
        for (int i = lo; i < hi; ++i) {
            const float l = clean(row[i]);
            const float e = ordered_key(l) >= kth ? expf((l - mx) * inv_t) : 0.0f;
            if (e > 0.0f && e >= tau_f) {
                run += e;
                if (run > target) { pick = i; break; }
            }
        }
        s_found = pick;
    }
    __syncthreads();
    // Rounding left the target past the end: the last kept token (its index is the block maximum).
    if (s_found < 0) {
        const float lk = block_max((float)last_kept);
        if (tid == 0) out[b] = (unsigned)(lk >= 0.0f ? (int)lk : argmax);
    } else if (tid == 0) {
        out[b] = (unsigned)s_found;
    }
}
