// Shared helpers of every pregate kernel source. Prepended to each source before NVRTC compiles it.
//
// Conventions: tensors are row-major and contiguous unless a `*_stride` argument says otherwise;
// `T` is the storage type (float or bf16); arithmetic is always f32 (`to_f32` / `from_f32`).
// Kernels whose storage type varies come in two entry points, `NAME_f32` and `NAME_bf16`.
#include <cuda_bf16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Expands X(suffix, type) once per storage type.
#define PG_DTYPES(X) X(f32, float) X(bf16, bf16)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// Deterministic: a fixed reduction tree.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? partial[lane] : 0.0f);
}

// Maximum over the block, returned to every thread.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? partial[lane] : -INFINITY);
}

__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + expf(-x)); }
