// Element types and reductions understood by every transport. The numeric values are part of the
// binding contract (gfcoll/_native.py maps torch dtypes to them).
#pragma once

#include <cstddef>
#include <cstdint>

#include "gfcoll/error.h"

namespace gfcoll {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kUInt8 = 4,
  kInt32 = 5,
  kInt64 = 6,
};
constexpr int kNumDTypes = 7;

enum class RedOp : int { kSum = 0, kAvg = 1, kMax = 2, kMin = 3 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  GF_THROW(kInvalidArgument, "unknown dtype code ", static_cast<int>(t));
}

inline bool is_floating(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "?";
}

// Reductions accumulate floating types in float32 and round once at the end, in group order, so
// every member (and every transport) computes bit-identical results. Integers reduce in their own
// type with two's-complement wrap-around. kAvg is defined for floating types only.
inline void check_reduction(DType t, RedOp op) {
  GF_ASSERT(!(op == RedOp::kAvg && !is_floating(t)), kUnsupported,
            "op 'avg' is not supported for integer dtype ", dtype_name(t));
}

}  // namespace gfcoll
