#include "host_reduce.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gfcoll {
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch and CUDA's __float2bfloat16_rn do.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal: value = mant * 2^-24.
    float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, matching torch's and CUDA's float -> half conversion.
inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    int shift = 14 - e;
    uint32_t hm = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (hm & 1u))) ++hm;
    return static_cast<uint16_t>(sign | hm);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return static_cast<uint16_t>(h);
}

template <typename T>
inline T wrap_add(T a, T b) {
  using U = std::make_unsigned_t<T>;
  return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
}

template <typename T>
void combine(RedOp op, T* acc, const T* src, size_t n) {
  switch (op) {
    case RedOp::kSum:
    case RedOp::kAvg:
      if constexpr (std::is_integral_v<T>) {
        for (size_t i = 0; i < n; ++i) acc[i] = wrap_add(acc[i], src[i]);
      } else {
        for (size_t i = 0; i < n; ++i) acc[i] += src[i];
      }
      break;
    case RedOp::kMax:
      for (size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], src[i]);
      break;
    case RedOp::kMin:
      for (size_t i = 0; i < n; ++i) acc[i] = std::min(acc[i], src[i]);
      break;
  }
}

// Converts a 16-bit float source in blocks so that the float32 combine loop stays vectorisable.
template <float (*ToFloat)(uint16_t)>
void combine16(RedOp op, float* acc, const uint16_t* src, size_t n) {
  constexpr size_t kBlock = 1024;
  float tmp[kBlock];
  for (size_t base = 0; base < n; base += kBlock) {
    size_t m = std::min(kBlock, n - base);
    for (size_t i = 0; i < m; ++i) tmp[i] = ToFloat(src[base + i]);
    combine<float>(op, acc + base, tmp, m);
  }
}

}  // namespace

size_t host_acc_elem_size(DType t) { return is_floating(t) ? 4 : dtype_size(t); }

void host_reduce_init(DType t, void* acc, const void* src, size_t count) {
  if (t == DType::kFloat16) {
    auto* a = static_cast<float*>(acc);
    auto* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < count; ++i) a[i] = half_to_float(s[i]);
  } else if (t == DType::kBFloat16) {
    auto* a = static_cast<float*>(acc);
    auto* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < count; ++i) a[i] = bf16_to_float(s[i]);
  } else {
    std::memcpy(acc, src, count * dtype_size(t));
  }
}

void host_reduce_accumulate(DType t, RedOp op, void* acc, const void* src, size_t count) {
  switch (t) {
    case DType::kFloat32:
      return combine(op, static_cast<float*>(acc), static_cast<const float*>(src), count);
    case DType::kFloat16:
      return combine16<half_to_float>(op, static_cast<float*>(acc), static_cast<const uint16_t*>(src), count);
    case DType::kBFloat16:
      return combine16<bf16_to_float>(op, static_cast<float*>(acc), static_cast<const uint16_t*>(src), count);
    case DType::kInt8:
      return combine(op, static_cast<int8_t*>(acc), static_cast<const int8_t*>(src), count);
    case DType::kUInt8:
      return combine(op, static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(src), count);
    case DType::kInt32:
      return combine(op, static_cast<int32_t*>(acc), static_cast<const int32_t*>(src), count);
    case DType::kInt64:
      return combine(op, static_cast<int64_t*>(acc), static_cast<const int64_t*>(src), count);
  }
}

void host_reduce_finish(DType t, RedOp op, void* dst, const void* acc, size_t count, int num_inputs) {
  const bool avg = op == RedOp::kAvg;
  if (t == DType::kFloat32) {
    auto* d = static_cast<float*>(dst);
    auto* a = static_cast<const float*>(acc);
    if (avg) {
      for (size_t i = 0; i < count; ++i) d[i] = a[i] / static_cast<float>(num_inputs);
    } else if (d != a) {
      std::memcpy(d, a, count * 4);
    }
  } else if (t == DType::kFloat16 || t == DType::kBFloat16) {
    auto* d = static_cast<uint16_t*>(dst);
    auto* a = static_cast<const float*>(acc);
    const bool half = t == DType::kFloat16;
    for (size_t i = 0; i < count; ++i) {
      float v = avg ? a[i] / static_cast<float>(num_inputs) : a[i];
      d[i] = half ? float_to_half(v) : float_to_bf16(v);
    }
  } else if (dst != acc) {
    std::memcpy(dst, acc, count * dtype_size(t));
  }
}

}  // namespace gfcoll
