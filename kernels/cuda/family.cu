// The attention and routing extras of the Hugging Face MoE families (Mixtral, Qwen2-MoE,
// Qwen3-MoE, OLMoE): QK RMSNorm per head or over the full width, clip_qkv, the in-model gate's
// softmax top-k, and the sigmoid-gated shared expert.

// In place, for token t < n_tokens and group g < groups: the `width` values at
// x[t * row_stride + g * width ..] are RMS-normalised with weight w[0 .. width), sums in f32.
// Per head: groups = heads, width = head_dim; full width: groups = 1, width = heads * head_dim.
// The row stride lets it work on the q or k part of a fused qkv buffer. grid: n_tokens * groups.
template <typename T>
__device__ void rmsnorm_groups_impl(T* x, const T* w, int n_tokens, int row_stride, int groups, int width, float eps) {
    const long long b = blockIdx.x;
    if (b >= (long long)n_tokens * groups) return;
    const int t = (int)(b / groups), g = (int)(b % groups);
    T* v = x + (long long)t * row_stride + (long long)g * width;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float f = to_f32(v[c]);
        ss += f * f;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)width + eps);
    // Every thread has read its own values before block_sum returned, so writing in place is safe.
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        v[c] = from_f32<T>(to_f32(v[c]) * inv * to_f32(w[c]));
}
#define RMSNORM_GROUPS(S, T) \
    extern "C" __global__ void rmsnorm_groups_##S(T* x, const T* w, int n_tokens, int row_stride, int groups, int width, float eps) { \
        rmsnorm_groups_impl<T>(x, w, n_tokens, row_stride, groups, width, eps); }
PG_DTYPES(RMSNORM_GROUPS)

// x[i] = clamp(x[i], -c, c) for i < n (OLMoE's clip_qkv); NaN stays NaN. grid-stride.
template <typename T>
__device__ void clamp_impl(T* x, long long n, float c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        if (v > c) x[i] = from_f32<T>(c);
        else if (v < -c) x[i] = from_f32<T>(-c);
    }
}
#define CLAMP(S, T) \
    extern "C" __global__ void clamp_##S(T* x, long long n, float c) { clamp_impl<T>(x, n, c); }
PG_DTYPES(CLAMP)

// The in-model gate, as transformers routes these families: per token, softmax over all
// n_experts logits in f32, the k largest probabilities in descending order (ties to the lower
// index) into ids[t, :] and their probabilities into weights[t, :], divided by their sum when
// `renormalize`. A row with a non-finite logit routes to experts 0 .. k with weight 0 (the
// token's NaN still reaches its logits, so its sequence fails alone at sampling), as the host
// gate does. One thread per token, grid-stride; k <= 8.
extern "C" __global__ void gate_softmax_topk(const float* logits, int n_tokens, int n_experts, int k, int renormalize, int* ids, float* weights) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n_tokens; t += gridDim.x * blockDim.x) {
        const float* row = logits + (long long)t * n_experts;
        bool finite = true;
        float mx = -INFINITY;
        for (int e = 0; e < n_experts; ++e) {
            const float v = row[e];
            finite &= isfinite(v);
            mx = fmaxf(mx, v);
        }
        int* out_ids = ids + (long long)t * k;
        float* out_w = weights + (long long)t * k;
        if (!finite) {
            for (int j = 0; j < k; ++j) {
                out_ids[j] = j;
                out_w[j] = 0.0f;
            }
            continue;
        }
        float sum = 0.0f;
        for (int e = 0; e < n_experts; ++e) sum += expf(row[e] - mx);
        int chosen[8];
        float prob[8];
        float picked = 0.0f;
        for (int j = 0; j < k; ++j) {
            int best = -1;
            float bp = -1.0f;
            for (int e = 0; e < n_experts; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
                if (taken) continue;
                const float p = expf(row[e] - mx) / sum;
                // Strictly greater: the lower index wins a tie.
                if (p > bp) {
                    best = e;
                    bp = p;
                }
            }
            chosen[j] = best;
            prob[j] = bp;
            picked += bp;
        }
        for (int j = 0; j < k; ++j) {
            out_ids[j] = chosen[j];
            out_w[j] = renormalize ? prob[j] / picked : prob[j];
        }
    }
}

// out[r, c] += sigmoid(gate[r]) * y[r, c] for a [rows, cols] matrix (Qwen2-MoE's shared expert,
// scaled by sigmoid(shared_expert_gate . x)); in f32, rounded once. grid-stride.
template <typename T>
__device__ void sigmoid_scale_add_impl(T* out, const T* y, const float* gate, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float s = 1.0f / (1.0f + expf(-gate[i / cols]));
        out[i] = from_f32<T>(to_f32(out[i]) + s * to_f32(y[i]));
    }
}
#define SIGMOID_SCALE_ADD(S, T) \
    extern "C" __global__ void sigmoid_scale_add_##S(T* out, const T* y, const float* gate, long long rows, int cols) { \
        sigmoid_scale_add_impl<T>(out, y, gate, rows, cols); }
PG_DTYPES(SIGMOID_SCALE_ADD)
