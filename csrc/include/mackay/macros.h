#pragma once
// MACKAY_HOST_DEVICE marks element math shared verbatim by the CPU and CUDA kernels.
#if defined(__CUDACC__)
#define MACKAY_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MACKAY_HOST_DEVICE inline
#endif
