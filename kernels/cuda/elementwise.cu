// Element-wise kernels: embedding gather, casts, residual and bias adds, SiLU, fused SiLU-and-mul.

// out[t, :] = table[ids[t], :]; an id >= vocab writes a zero row. grid: n_tokens blocks.
template <typename T>
__device__ void embedding_impl(const unsigned* ids, const T* table, T* out, int n_tokens, int hidden, int vocab) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const unsigned id = ids[t];
    T* dst = out + (long long)t * hidden;
    if (id >= (unsigned)vocab) {
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = from_f32<T>(0.0f);
        return;
    }
    const T* src = table + (long long)id * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
}
#define EMBEDDING(S, T) \
    extern "C" __global__ void embedding_##S(const unsigned* ids, const T* table, T* out, int n_tokens, int hidden, int vocab) { \
        embedding_impl<T>(ids, table, out, n_tokens, hidden, vocab); }
PG_DTYPES(EMBEDDING)

// Round to nearest even.
extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(x[i]);
}

// x[i] += y[i] (the residual add).
template <typename T>
__device__ void add_impl(T* x, const T* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
}
#define ADD(S, T) extern "C" __global__ void add_##S(T* x, const T* y, long long n) { add_impl<T>(x, y, n); }
PG_DTYPES(ADD)

// x[r, c] += bias[c] for a [rows, cols] matrix.
template <typename T>
__device__ void bias_add_impl(T* x, const T* bias, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
}
#define BIAS_ADD(S, T) \
    extern "C" __global__ void bias_add_##S(T* x, const T* bias, long long rows, int cols) { bias_add_impl<T>(x, bias, rows, cols); }
PG_DTYPES(BIAS_ADD)

// x[i] = silu(x[i]) = x / (1 + exp(-x)), in place.
template <typename T>
__device__ void silu_impl(T* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(silu_f32(to_f32(x[i])));
}
#define SILU(S, T) extern "C" __global__ void silu_##S(T* x, long long n) { silu_impl<T>(x, n); }
PG_DTYPES(SILU)

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]: gate_up is [rows, 2 * inter] with the
// gate projection in the first `inter` columns and the up projection in the last `inter`.
template <typename T>
__device__ void silu_mul_impl(const T* gate_up, T* out, long long rows, int inter) {
    const long long n = rows * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / inter;
        const int c = (int)(i - r * inter);
        const T* row = gate_up + r * 2 * inter;
        out[i] = from_f32<T>(silu_f32(to_f32(row[c])) * to_f32(row[inter + c]));
    }
}
#define SILU_MUL(S, T) \
    extern "C" __global__ void silu_mul_##S(const T* gate_up, T* out, long long rows, int inter) { silu_mul_impl<T>(gate_up, out, rows, inter); }
PG_DTYPES(SILU_MUL)
