// CUDA reduction used by the nccl transport: dst[i] = op over k of srcs[k][i], accumulated in
// group order in float32 for floating dtypes (integers in their own type, wrapping), rounded once.
// The same arithmetic as host_reduce.h, so both transports give bit-identical results.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "gfcoll/types.h"

namespace gfcoll {

constexpr int kMaxReduceInputs = 64;

// srcs: `num_inputs` device pointers (a host array); dst may equal one of them (element-wise in
// place). Enqueued on `stream`; returns immediately.
void launch_reduce(DType dtype, RedOp op, void* dst, const void* const* srcs, int num_inputs, size_t count,
                   cudaStream_t stream);

}  // namespace gfcoll
