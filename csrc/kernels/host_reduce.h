// CPU reduction loops used by the host transport. Pointers and counts only.
//
// Reductions run in three phases over an accumulator whose element type is float32 for floating
// dtypes and the dtype itself for integers (see types.h): init (acc = src), accumulate
// (acc = acc op src, called once per further member in group order), finish (dst = round(acc), with
// the division for avg). This fixed order makes results bit-identical on every member.
#pragma once

#include <cstddef>

#include "gfcoll/types.h"

namespace gfcoll {

size_t host_acc_elem_size(DType t);
void host_reduce_init(DType t, void* acc, const void* src, size_t count);
void host_reduce_accumulate(DType t, RedOp op, void* acc, const void* src, size_t count);
void host_reduce_finish(DType t, RedOp op, void* dst, const void* acc, size_t count, int num_inputs);

}  // namespace gfcoll
