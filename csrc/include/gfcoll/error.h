// One error type for the whole native core. Every failure is thrown as gfcoll::Error and
// mapped by the bindings to a Python exception subclass chosen by its code.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

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
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
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
