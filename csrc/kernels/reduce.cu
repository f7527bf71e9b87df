#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "reduce.h"

namespace gfcoll {
namespace {

struct ReduceInputs {
  const void* ptr[kMaxReduceInputs];
};

template <typename T>
struct Acc {
  using type = T;
  __device__ static type load(T v) { return v; }
  __device__ static T store(type v) { return v; }
};
template <>
struct Acc<float> {
  using type = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Acc<__half> {
  using type = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename A>
__device__ inline A combine(RedOp op, A a, A b) {
  switch (op) {
    // The same comparisons as std::max / std::min in host_reduce.cc (signed zeros included).
    case RedOp::kMax: return a < b ? b : a;
    case RedOp::kMin: return b < a ? b : a;
    default:
      if constexpr (std::is_integral_v<A>) {
        using U = std::make_unsigned_t<A>;
        return static_cast<A>(static_cast<U>(a) + static_cast<U>(b));
      } else {
        return a + b;
      }
  }
}

// One thread per element (grid-stride); inputs are read once each, in group order.
template <typename T>
__global__ void reduce_kernel(ReduceInputs in, T* dst, int num_inputs, size_t count, RedOp op) {
  using A = typename Acc<T>::type;
  size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    A acc = Acc<T>::load(static_cast<const T*>(in.ptr[0])[i]);
    for (int k = 1; k < num_inputs; ++k) acc = combine<A>(op, acc, Acc<T>::load(static_cast<const T*>(in.ptr[k])[i]));
    if constexpr (!std::is_integral_v<A>) {
      if (op == RedOp::kAvg) acc = acc / static_cast<float>(num_inputs);
    }
    dst[i] = Acc<T>::store(acc);
  }
}

template <typename T>
void launch(RedOp op, void* dst, const ReduceInputs& in, int n, size_t count, cudaStream_t stream) {
  constexpr int kThreads = 512;
  int device = 0, sms = 0;
  GF_CHECK_CUDA(cudaGetDevice(&device));
  GF_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  size_t blocks = (count + kThreads - 1) / kThreads;
  // 8 blocks of 512 threads per SM saturate memory bandwidth; more only adds scheduling.
  blocks = blocks < static_cast<size_t>(sms) * 8 ? blocks : static_cast<size_t>(sms) * 8;
  reduce_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, static_cast<T*>(dst), n, count, op);
  GF_CHECK_CUDA(cudaGetLastError());
}

}  // namespace

void launch_reduce(DType dtype, RedOp op, void* dst, const void* const* srcs, int num_inputs, size_t count,
                   cudaStream_t stream) {
  GF_ASSERT(num_inputs >= 1 && num_inputs <= kMaxReduceInputs, kUnsupported, "GPU reductions support 1 to ",
            kMaxReduceInputs, " members, got ", num_inputs);
  check_reduction(dtype, op);
  if (count == 0) return;
  ReduceInputs in{};
  for (int k = 0; k < num_inputs; ++k) in.ptr[k] = srcs[k];
  switch (dtype) {
    case DType::kFloat32: return launch<float>(op, dst, in, num_inputs, count, stream);
    case DType::kFloat16: return launch<__half>(op, dst, in, num_inputs, count, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(op, dst, in, num_inputs, count, stream);
    case DType::kInt8: return launch<int8_t>(op, dst, in, num_inputs, count, stream);
    case DType::kUInt8: return launch<uint8_t>(op, dst, in, num_inputs, count, stream);
    case DType::kInt32: return launch<int32_t>(op, dst, in, num_inputs, count, stream);
    case DType::kInt64: return launch<int64_t>(op, dst, in, num_inputs, count, stream);
  }
}

}  // namespace gfcoll
