// One error type for the whole native core. Every failure is thrown as gfcoll::Error and
// mapped by the bindings to a Python exception subclass chosen by its code.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace gfcoll {

enum class ErrorCode : int {
  kInvalidArgument = 1,  // bad ranks, sizes, dtypes, splits (maps to GfcollValueError)
  kUnsupported = 2,      // valid request this build or transport cannot serve
  kTimeout = 3,          // a peer did not answer within the timeout
  kPeerDied = 4,         // a peer process is gone (subclass of timeout in Python)
  kClosed = 5,           // use after close()
  kSystem = 6,           // an OS call failed (shm_open, mmap, ...)
  kCuda = 7,             // a CUDA runtime call failed
  kNccl = 8,             // an NCCL call failed
  kMismatch = 9,         // members disagree about an operation (sizes, dtype)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& where, const std::string& message)
      : std::runtime_error(message + " [" + where + "]"), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {
// Error messages are built from plain strings, never iostreams: on the GPU build a message formatted
// through std::ostringstream crashed the process (SIGSEGV inside the stream's locale machinery,
// seen on H100 and H200, 2026-12-05/06) whenever an error was raised, so every error path must stay
// clear of <sstream> and <iostream>.
template <typename T>
inline constexpr bool kAlwaysFalse = false;

template <typename T>
void append(std::string& out, const T& v) {
  using U = std::decay_t<T>;
  if constexpr (std::is_same_v<U, bool>) {
    out += v ? "true" : "false";
  } else if constexpr (std::is_same_v<U, char>) {
    out += v;
  } else if constexpr (std::is_same_v<U, const char*> || std::is_same_v<U, char*>) {
    out += v != nullptr ? v : "(null)";
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    out += std::string_view(v);
  } else if constexpr (std::is_enum_v<U>) {
    out += std::to_string(static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<U>) {
    out += std::to_string(v);
  } else if constexpr (std::is_floating_point_v<U>) {
    char buf[40];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    out += buf;
  } else if constexpr (std::is_pointer_v<U>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%p", static_cast<const void*>(v));
    out += buf;
  } else {
    static_assert(kAlwaysFalse<T>, "gfcoll error messages take strings, numbers, enums and pointers");
  }
}

template <typename... Args>
std::string concat(Args&&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}
}  // namespace detail

}  // namespace gfcoll

#define GF_STR2(x) #x
#define GF_STR(x) GF_STR2(x)
#define GF_WHERE (std::string(__FILE__).substr(std::string(__FILE__).rfind('/') + 1) + ":" GF_STR(__LINE__))

#define GF_THROW(code, ...) \
  throw ::gfcoll::Error(::gfcoll::ErrorCode::code, GF_WHERE, ::gfcoll::detail::concat(__VA_ARGS__))

#define GF_ASSERT(cond, code, ...)  \
  do {                              \
    if (!(cond)) {                  \
      GF_THROW(code, __VA_ARGS__);  \
    }                               \
  } while (0)

#define GF_CHECK_CUDA(expr)                                                                     \
  do {                                                                                          \
    cudaError_t gf_err_ = (expr);                                                               \
    if (gf_err_ != cudaSuccess) {                                                               \
      GF_THROW(kCuda, #expr, " failed: ", cudaGetErrorName(gf_err_), ": ", cudaGetErrorString(gf_err_)); \
    }                                                                                           \
  } while (0)
