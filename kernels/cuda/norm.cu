// RMSNorm and rotary position embeddings.

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, accumulated in f32. grid: rows blocks.
template <typename T>
__device__ void rmsnorm_impl(const T* x, const T* w, T* out, int rows, int cols, float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (long long)r * cols;
    T* orow = out + (long long)r * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        orow[c] = from_f32<T>(to_f32(xr[c]) * inv * to_f32(w[c]));
}
#define RMSNORM(S, T) \
    extern "C" __global__ void rmsnorm_##S(const T* x, const T* w, T* out, int rows, int cols, float eps) { \
        rmsnorm_impl<T>(x, w, out, rows, cols, eps); }
PG_DTYPES(RMSNORM)

// Hugging Face "rotate half" RoPE, in place, on x[t, h, :] = x[t * row_stride + h * head_dim ..]
// for h < n_heads, at position positions[t]. Angles pos * theta^(-2i/d) in f64 (long positions
// lose the low bits of the phase in f32), cos/sin rounded to f32, the rotation in f32.
// grid: n_tokens blocks; dynamic shared memory: head_dim floats.
template <typename T>
__device__ void rope_impl(T* x, const int* positions, int n_tokens, int row_stride, int n_heads, int head_dim, float theta) {
    extern __shared__ float cs[];  // cos in [0, half), sin in [half, 2 * half)
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int half = head_dim / 2;
    const double pos = (double)positions[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const double a = pos * pow((double)theta, -2.0 * (double)i / (double)head_dim);
        cs[i] = (float)cos(a);
        cs[half + i] = (float)sin(a);
    }
    __syncthreads();
    T* row = x + (long long)t * row_stride;
    for (int j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
        const int h = j / half, i = j - h * half;
        T* head = row + h * head_dim;
        const float x0 = to_f32(head[i]), x1 = to_f32(head[i + half]);
        const float c = cs[i], s = cs[half + i];
        head[i] = from_f32<T>(x0 * c - x1 * s);
        head[i + half] = from_f32<T>(x1 * c + x0 * s);
    }
}
#define ROPE(S, T) \
    extern "C" __global__ void rope_##S(T* x, const int* positions, int n_tokens, int row_stride, int n_heads, int head_dim, float theta) { \
        rope_impl<T>(x, positions, n_tokens, row_stride, n_heads, head_dim, theta); }
PG_DTYPES(ROPE)
