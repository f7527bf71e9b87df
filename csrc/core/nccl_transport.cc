// NCCL transport; see Note [nccl masked collectives] in nccl_transport.h.
#include "gfcoll/nccl_transport.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <cstring>

#include "../kernels/reduce.h"

namespace gfcoll {

// The NCCL entry points gfcoll uses, resolved with dlsym from one loaded libnccl. Declared from
// nccl.h so that a signature change is a compile error.
struct NcclLib {
  void* handle = nullptr;
  std::string path;
  decltype(&::ncclGetVersion) GetVersion = nullptr;
  decltype(&::ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&::ncclCommInitRank) CommInitRank = nullptr;
  decltype(&::ncclCommDestroy) CommDestroy = nullptr;
  decltype(&::ncclCommAbort) CommAbort = nullptr;
  decltype(&::ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&::ncclGetErrorString) GetErrorString = nullptr;
  decltype(&::ncclGetLastError) GetLastError = nullptr;
  decltype(&::ncclGroupStart) GroupStart = nullptr;
  decltype(&::ncclGroupEnd) GroupEnd = nullptr;
  decltype(&::ncclSend) Send = nullptr;
  decltype(&::ncclRecv) Recv = nullptr;
};

namespace {

template <typename F>
void resolve(NcclLib& lib, F& fn, const char* name) {
  fn = reinterpret_cast<F>(dlsym(lib.handle, name));
  GF_ASSERT(fn != nullptr, kNccl, "symbol ", name, " missing from ", lib.path);
}

std::string loaded_path(void* handle, void* symbol) {
  Dl_info info;
  if (symbol != nullptr && dladdr(symbol, &info) != 0 && info.dli_fname != nullptr) return info.dli_fname;
  (void)handle;
  return "libnccl.so.2";
}

}  // namespace

#define GF_CHECK_NCCL(lib, expr)                                                                  \
  do {                                                                                            \
    ncclResult_t gf_res_ = (expr);                                                                \
    if (gf_res_ != ncclSuccess && gf_res_ != ncclInProgress) {                                    \
      const char* last = (lib).GetLastError ? (lib).GetLastError(nullptr) : "";                   \
      GF_THROW(kNccl, #expr, " failed: ", (lib).GetErrorString(gf_res_), (last && *last ? ": " : ""), \
               (last ? last : ""));                                                               \
    }                                                                                             \
  } while (0)

std::string NcclTransport::default_library() { return "libnccl.so.2"; }

NcclTransport::NcclTransport(const std::string& library) : lib_(std::make_unique<NcclLib>()) {
  NcclLib& lib = *lib_;
  if (library.empty()) {
    // Prefer the libnccl that is already in the process (torch's), so both use one copy.
    lib.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD);
    if (lib.handle == nullptr) lib.handle = dlopen("libnccl.so.2", RTLD_NOW);
  } else {
    lib.handle = dlopen(library.c_str(), RTLD_NOW);
  }
  if (lib.handle == nullptr) {
    const char* err = dlerror();
    GF_THROW(kNccl, "cannot load NCCL (", library.empty() ? "libnccl.so.2" : library,
             "): ", err ? err : "unknown error", "; set GFCOLL_NCCL_PATH to libnccl.so.2");
  }
  lib.path = library.empty() ? "libnccl.so.2" : library;
  resolve(lib, lib.GetVersion, "ncclGetVersion");
  lib.path = loaded_path(lib.handle, reinterpret_cast<void*>(lib.GetVersion));
  resolve(lib, lib.GetUniqueId, "ncclGetUniqueId");
  resolve(lib, lib.CommInitRank, "ncclCommInitRank");
  resolve(lib, lib.CommDestroy, "ncclCommDestroy");
  resolve(lib, lib.CommAbort, "ncclCommAbort");
  resolve(lib, lib.CommGetAsyncError, "ncclCommGetAsyncError");
  resolve(lib, lib.GetErrorString, "ncclGetErrorString");
  resolve(lib, lib.GetLastError, "ncclGetLastError");
  resolve(lib, lib.GroupStart, "ncclGroupStart");
  resolve(lib, lib.GroupEnd, "ncclGroupEnd");
  resolve(lib, lib.Send, "ncclSend");
  resolve(lib, lib.Recv, "ncclRecv");
}

NcclTransport::~NcclTransport() {
  stop_watchdog();
  // Freeing a communicator is collective work for NCCL's proxy threads; close() is the explicit
  // teardown. Here only the library reference is dropped (never dlclose a shared libnccl).
}

std::string NcclTransport::library_path() const { return lib_->path; }

int NcclTransport::version() const {
  int v = 0;
  GF_CHECK_NCCL(*lib_, lib_->GetVersion(&v));
  return v;
}

std::string NcclTransport::unique_id() const {
  ncclUniqueId id;
  GF_CHECK_NCCL(*lib_, lib_->GetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

void NcclTransport::init(int rank, int world_size, const std::string& id, int device) {
  GF_ASSERT(comm_ == nullptr && !closed_, kInvalidArgument, "nccl transport already initialised");
  GF_ASSERT(id.size() == sizeof(ncclUniqueId::internal), kInvalidArgument, "bad NCCL unique id size ", id.size());
  ncclUniqueId uid;
  std::memcpy(uid.internal, id.data(), id.size());
  GF_CHECK_CUDA(cudaSetDevice(device));
  ncclComm_t comm = nullptr;
  GF_CHECK_NCCL(*lib_, lib_->CommInitRank(&comm, world_size, uid, rank));
  comm_ = comm;
  rank_ = rank;
  world_size_ = world_size;
  device_ = device;
  // Scratch for reductions comes from the stream-ordered pool; keep freed blocks in the pool
  // instead of returning them to the driver at every synchronisation.
  cudaMemPool_t pool;
  GF_CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = UINT64_MAX;
  GF_CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
}

void NcclTransport::check_ready() const {
  check();
  GF_ASSERT(!closed_, kClosed, "the gfcoll world was closed");
  GF_ASSERT(comm_ != nullptr, kInvalidArgument, "nccl transport not initialised");
}

void NcclTransport::check_members(const std::vector<int>& members, int me, const char* what) const {
  check_ready();
  GF_ASSERT(me >= 0 && me < static_cast<int>(members.size()) && members[me] == rank_, kInvalidArgument,
            what, ": rank ", rank_, " is not member ", me, " of the group");
}

namespace {
struct GroupGuard {
  // ncclGroupEnd must follow ncclGroupStart even when an enqueue in between throws.
  explicit GroupGuard(NcclLib& lib) : lib_(lib) { GF_CHECK_NCCL(lib_, lib_.GroupStart()); }
  void end() {
    open_ = false;
    GF_CHECK_NCCL(lib_, lib_.GroupEnd());
  }
  ~GroupGuard() {
    if (open_) lib_.GroupEnd();
  }
  NcclLib& lib_;
  bool open_ = true;
};
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

void NcclTransport::warmup() {
  check_ready();
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  cudaStream_t stream;
  GF_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  void* buf = nullptr;
  GF_CHECK_CUDA(cudaMalloc(&buf, 2 * static_cast<size_t>(world_size_)));
  auto comm = static_cast<ncclComm_t>(comm_);
  {
    GroupGuard g(*lib_);
    for (int p = 0; p < world_size_; ++p) {
      if (p == rank_ || (!comm_rank_of_.empty() && comm_rank_of_[p] < 0)) continue;
      GF_CHECK_NCCL(*lib_, lib_->Send(static_cast<char*>(buf) + p, 1, ncclUint8, peer(p), comm, stream));
      GF_CHECK_NCCL(*lib_, lib_->Recv(static_cast<char*>(buf) + world_size_ + p, 1, ncclUint8, peer(p), comm, stream));
    }
    g.end();
  }
  GF_CHECK_CUDA(cudaStreamSynchronize(stream));
  GF_CHECK_CUDA(cudaFree(buf));
  GF_CHECK_CUDA(cudaStreamDestroy(stream));
}

void NcclTransport::all_gather(const std::vector<int>& members, int me, const void* in, void* out,
                               uint64_t bytes, uintptr_t stream_) {
  check_members(members, me, "all_gather");
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  char* dst = static_cast<char*>(out);
  if (dst + me * bytes != in) {
    GF_CHECK_CUDA(cudaMemcpyAsync(dst + me * bytes, in, bytes, cudaMemcpyDeviceToDevice, stream));
  }
  GroupGuard g(*lib_);
  for (size_t j = 0; j < members.size(); ++j) {
    if (static_cast<int>(j) == me) continue;
    GF_CHECK_NCCL(*lib_, lib_->Send(in, bytes, ncclUint8, peer(members[j]), comm, stream));
    GF_CHECK_NCCL(*lib_, lib_->Recv(dst + j * bytes, bytes, ncclUint8, peer(members[j]), comm, stream));
  }
  g.end();
  track(stream);
}

void NcclTransport::all_to_all(const std::vector<int>& members, int me, const void* in, void* out,
                               const std::vector<uint64_t>& in_offsets, const std::vector<uint64_t>& in_sizes,
                               const std::vector<uint64_t>& out_offsets, const std::vector<uint64_t>& out_sizes,
                               uintptr_t stream_) {
  check_members(members, me, "all_to_all");
  const size_t n = members.size();
  GF_ASSERT(in_offsets.size() == n && in_sizes.size() == n && out_offsets.size() == n && out_sizes.size() == n,
            kInvalidArgument, "all_to_all: split lists must have one entry per member");
  GF_ASSERT(in_sizes[me] == out_sizes[me], kMismatch, "all_to_all: rank ", rank_, " sends itself ",
            in_sizes[me], " bytes but expects ", out_sizes[me]);
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  if (in_sizes[me] > 0) {
    GF_CHECK_CUDA(cudaMemcpyAsync(dst + out_offsets[me], src + in_offsets[me], in_sizes[me],
                                  cudaMemcpyDeviceToDevice, stream));
  }
  GroupGuard g(*lib_);
  for (size_t j = 0; j < n; ++j) {
    if (static_cast<int>(j) == me) continue;
    if (in_sizes[j] > 0) GF_CHECK_NCCL(*lib_, lib_->Send(src + in_offsets[j], in_sizes[j], ncclUint8, peer(members[j]), comm, stream));
    if (out_sizes[j] > 0) GF_CHECK_NCCL(*lib_, lib_->Recv(dst + out_offsets[j], out_sizes[j], ncclUint8, peer(members[j]), comm, stream));
  }
  g.end();
  track(stream);
}

void NcclTransport::reduce_scatter(const std::vector<int>& members, int me, const void* in, void* out,
                                   uint64_t count, DType dtype, RedOp op, uintptr_t stream_) {
  check_members(members, me, "reduce_scatter");
  check_reduction(dtype, op);
  const int n = static_cast<int>(members.size());
  GF_ASSERT(n <= kMaxReduceInputs, kUnsupported, "reduce_scatter on CUDA supports up to ", kMaxReduceInputs,
            " members, got ", n);
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  const uint64_t block = count * dtype_size(dtype);
  const char* src = static_cast<const char*>(in);
  char* scratch = nullptr;
  if (n > 1) GF_CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&scratch), block * (n - 1), stream));
  auto slot = [&](int k) { return scratch + block * (k < me ? k : k - 1); };
  {
    GroupGuard g(*lib_);
    for (int j = 0; j < n; ++j) {
      if (j == me) continue;
      GF_CHECK_NCCL(*lib_, lib_->Send(src + block * j, block, ncclUint8, peer(members[j]), comm, stream));
      GF_CHECK_NCCL(*lib_, lib_->Recv(slot(j), block, ncclUint8, peer(members[j]), comm, stream));
    }
    g.end();
  }
  std::vector<const void*> srcs(n);
  for (int k = 0; k < n; ++k) srcs[k] = k == me ? src + block * me : slot(k);
  launch_reduce(dtype, op, out, srcs.data(), n, count, stream);
  if (scratch != nullptr) GF_CHECK_CUDA(cudaFreeAsync(scratch, stream));
  track(stream);
}

void NcclTransport::all_reduce(const std::vector<int>& members, int me, const void* in, void* out,
                               uint64_t count, DType dtype, RedOp op, uintptr_t stream_) {
  check_members(members, me, "all_reduce");
  check_reduction(dtype, op);
  const int n = static_cast<int>(members.size());
  GF_ASSERT(n <= kMaxReduceInputs, kUnsupported, "all_reduce on CUDA supports up to ", kMaxReduceInputs,
            " members, got ", n);
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  const size_t es = dtype_size(dtype);
  // Member j owns elements [first(j), first(j + 1)): reduce-scatter into the owner, then all-gather.
  const uint64_t per = (count + n - 1) / n;
  auto first = [&](int j) { return std::min<uint64_t>(count, per * j); };
  auto len = [&](int j) { return first(j + 1) - first(j); };
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  const uint64_t mine = len(me) * es;
  char* scratch = nullptr;
  if (n > 1 && mine > 0) GF_CHECK_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&scratch), mine * (n - 1), stream));
  auto slot = [&](int k) { return scratch + mine * (k < me ? k : k - 1); };
  {
    GroupGuard g(*lib_);
    for (int j = 0; j < n; ++j) {
      if (j == me) continue;
      if (len(j) > 0) GF_CHECK_NCCL(*lib_, lib_->Send(src + first(j) * es, len(j) * es, ncclUint8, peer(members[j]), comm, stream));
      if (mine > 0) GF_CHECK_NCCL(*lib_, lib_->Recv(slot(j), mine, ncclUint8, peer(members[j]), comm, stream));
    }
    g.end();
  }
  if (mine > 0) {
    std::vector<const void*> srcs(n);
    for (int k = 0; k < n; ++k) srcs[k] = k == me ? src + first(me) * es : slot(k);
    launch_reduce(dtype, op, dst + first(me) * es, srcs.data(), n, len(me), stream);
    if (scratch != nullptr) GF_CHECK_CUDA(cudaFreeAsync(scratch, stream));
  }
  if (n == 1) return;
  GroupGuard g(*lib_);
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    if (mine > 0) GF_CHECK_NCCL(*lib_, lib_->Send(dst + first(me) * es, mine, ncclUint8, peer(members[j]), comm, stream));
    if (len(j) > 0) GF_CHECK_NCCL(*lib_, lib_->Recv(dst + first(j) * es, len(j) * es, ncclUint8, peer(members[j]), comm, stream));
  }
  g.end();
  track(stream);
}

// At and above this size (and with more than two members) a broadcast is a scatter from the root
// followed by an all-gather, so the root's link carries each byte once instead of n - 1 times.
// From the 4 x H100 sweep (bench/results/2026-11-27-h100): direct sends from the root matched
// NCCL up to 4 MiB and fell to 0.47x of it at 16 MiB.
constexpr uint64_t kScatterBroadcastBytes = 4ull << 20;

void NcclTransport::broadcast(const std::vector<int>& members, int me, int root_index, void* buf, uint64_t bytes,
                              uintptr_t stream_) {
  check_members(members, me, "broadcast");
  const int n = static_cast<int>(members.size());
  GF_ASSERT(root_index >= 0 && root_index < n, kInvalidArgument, "broadcast: bad root index ", root_index);
  if (bytes == 0 || n == 1) return;
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  char* data = static_cast<char*>(buf);
  if (n == 2 || bytes < kScatterBroadcastBytes) {
    GroupGuard g(*lib_);
    if (me == root_index) {
      for (int j = 0; j < n; ++j) {
        if (j != me) GF_CHECK_NCCL(*lib_, lib_->Send(data, bytes, ncclUint8, peer(members[j]), comm, stream));
      }
    } else {
      GF_CHECK_NCCL(*lib_, lib_->Recv(data, bytes, ncclUint8, peer(members[root_index]), comm, stream));
    }
    g.end();
    track(stream);
    return;
  }
  // Piece j, [first(j), first(j + 1)), is scattered to member j, then every member forwards its
  // piece to the other non-roots.
  const uint64_t per = (bytes + n - 1) / n;
  auto first = [&](int j) { return std::min<uint64_t>(bytes, per * j); };
  auto len = [&](int j) { return first(j + 1) - first(j); };
  {
    GroupGuard g(*lib_);
    if (me == root_index) {
      for (int j = 0; j < n; ++j) {
        if (j != me && len(j) > 0) GF_CHECK_NCCL(*lib_, lib_->Send(data + first(j), len(j), ncclUint8, peer(members[j]), comm, stream));
      }
    } else if (len(me) > 0) {
      GF_CHECK_NCCL(*lib_, lib_->Recv(data + first(me), len(me), ncclUint8, peer(members[root_index]), comm, stream));
    }
    g.end();
  }
  GroupGuard g(*lib_);
  for (int j = 0; j < n; ++j) {
    if (j == me || j == root_index) continue;
    if (len(me) > 0) GF_CHECK_NCCL(*lib_, lib_->Send(data + first(me), len(me), ncclUint8, peer(members[j]), comm, stream));
    if (me != root_index && len(j) > 0) {
      GF_CHECK_NCCL(*lib_, lib_->Recv(data + first(j), len(j), ncclUint8, peer(members[j]), comm, stream));
    }
  }
  if (me != root_index && len(root_index) > 0) {
    GF_CHECK_NCCL(*lib_, lib_->Recv(data + first(root_index), len(root_index), ncclUint8, peer(members[root_index]), comm, stream));
  }
  g.end();
  track(stream);
}

void NcclTransport::batch_p2p(const std::vector<NcclP2P>& ops, uintptr_t stream_) {
  check_ready();
  for (const auto& x : ops) {
    GF_ASSERT(x.peer >= 0 && x.peer < world_size_ && x.peer != rank_, kInvalidArgument, "p2p: bad peer rank ",
              x.peer, " for rank ", rank_);
  }
  std::lock_guard<std::mutex> lock(mu_);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  auto stream = as_stream(stream_);
  auto comm = static_cast<ncclComm_t>(comm_);
  GroupGuard g(*lib_);
  for (const auto& x : ops) {
    if (x.bytes == 0) continue;
    if (x.is_send) {
      GF_CHECK_NCCL(*lib_, lib_->Send(x.ptr, x.bytes, ncclUint8, peer(x.peer), comm, stream));
    } else {
      GF_CHECK_NCCL(*lib_, lib_->Recv(x.ptr, x.bytes, ncclUint8, peer(x.peer), comm, stream));
    }
  }
  g.end();
  track(stream);
}

int NcclTransport::peer(int global) const {
  if (comm_rank_of_.empty()) return global;
  const int r = comm_rank_of_[global];
  GF_ASSERT(r >= 0, kPeerDied, "nccl: rank ", global, " is not in the shrunk communicator (lost)");
  return r;
}

uintptr_t NcclTransport::comm_handle() {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_ ? 0 : reinterpret_cast<uintptr_t>(comm_);
}

void NcclTransport::adopt(uintptr_t comm, const std::vector<int>& comm_rank_of) {
  GF_ASSERT(comm != 0, kInvalidArgument, "adopt: no communicator");
  GF_ASSERT(static_cast<int>(comm_rank_of.size()) == world_size_, kInvalidArgument, "adopt: a rank map of ",
            comm_rank_of.size(), " entries for a world of ", world_size_);
  GF_ASSERT(comm_rank_of[rank_] >= 0, kInvalidArgument, "adopt: rank ", rank_, " is not in the new communicator");
  std::vector<int> seen(world_size_, 0);
  for (int r : comm_rank_of) {
    GF_ASSERT(r < world_size_, kInvalidArgument, "adopt: communicator rank ", r, " out of range");
    if (r >= 0) {
      GF_ASSERT(!seen[r], kInvalidArgument, "adopt: communicator rank ", r, " given twice");
      seen[r] = 1;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  GF_ASSERT(!closed_, kClosed, "the gfcoll world was closed");
  void* old = nullptr;
  {
    // The watchdog reads comm_ under wd_mu_; operations use it under mu_ (held).
    std::lock_guard<std::mutex> wd_lock(wd_mu_);
    old = comm_;
    comm_ = reinterpret_cast<void*>(comm);
    comm_rank_of_ = comm_rank_of;
    // What was in flight ran on the old communicator, which the shrink (NCCL_SHRINK_ABORT) ended.
    for (auto& f : inflight_) event_pool_.push_back(f.event);
    inflight_.clear();
    error_.clear();
    error_code_ = ErrorCode::kNccl;
    failed_.store(false, std::memory_order_release);
  }
  if (old != nullptr && old != comm_) lib_->CommAbort(static_cast<ncclComm_t>(old));
}

void NcclTransport::check_async_error() {
  if (comm_ == nullptr) return;
  ncclResult_t res = ncclSuccess;
  GF_CHECK_NCCL(*lib_, lib_->CommGetAsyncError(static_cast<ncclComm_t>(comm_), &res));
  GF_ASSERT(res == ncclSuccess || res == ncclInProgress, kNccl, "NCCL reported an asynchronous error: ",
            lib_->GetErrorString(res));
}

void NcclTransport::start_watchdog(double timeout_s) {
  check_ready();
  std::lock_guard<std::mutex> lock(wd_mu_);
  if (wd_.joinable()) return;
  timeout_s_ = timeout_s;
  wd_ = std::thread([this] { watchdog(); });
}

void NcclTransport::check() const {
  if (!failed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(wd_mu_);
  throw Error(error_code_, "nccl watchdog", error_);
}

void NcclTransport::track(void* stream) {
  // Called with mu_ held, after an operation was enqueued on `stream`.
  {
    std::lock_guard<std::mutex> lock(wd_mu_);
    if (!wd_.joinable()) return;
  }
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  GF_CHECK_CUDA(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &cs));
  if (cs != cudaStreamCaptureStatusNone) return;
  std::lock_guard<std::mutex> lock(wd_mu_);
  cudaEvent_t ev;
  if (event_pool_.empty()) {
    GF_CHECK_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  } else {
    ev = static_cast<cudaEvent_t>(event_pool_.back());
    event_pool_.pop_back();
  }
  GF_CHECK_CUDA(cudaEventRecord(ev, static_cast<cudaStream_t>(stream)));
  inflight_.push_back({ev, std::chrono::steady_clock::now() +
                               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                   std::chrono::duration<double>(timeout_s_))});
}

void NcclTransport::watchdog() {
  cudaSetDevice(device_);
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;  // never invalidate another thread's capture
  cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(wd_mu_);
  while (!wd_stop_) {
    wd_cv_.wait_for(lock, std::chrono::milliseconds(20));
    if (wd_stop_ || failed_.load()) continue;
    while (!inflight_.empty() && cudaEventQuery(static_cast<cudaEvent_t>(inflight_.front().event)) == cudaSuccess) {
      event_pool_.push_back(inflight_.front().event);
      inflight_.pop_front();
    }
    cudaGetLastError();
    ncclResult_t res = ncclSuccess;
    std::string why;
    ErrorCode code = ErrorCode::kNccl;
    if (comm_ != nullptr && lib_->CommGetAsyncError(static_cast<ncclComm_t>(comm_), &res) == ncclSuccess &&
        res != ncclSuccess && res != ncclInProgress) {
      why = std::string("NCCL reported an asynchronous error: ") + lib_->GetErrorString(res);
    } else if (!inflight_.empty() && std::chrono::steady_clock::now() > inflight_.front().deadline) {
      code = ErrorCode::kTimeout;
      why = detail::concat("an nccl operation of rank ", rank_, " did not complete within GFCOLL_TIMEOUT_S=",
                           timeout_s_, " s (a peer is dead or did not take part)");
    }
    if (why.empty()) continue;
    error_code_ = code;
    error_ = why + "; the communicator was aborted";
    failed_.store(true, std::memory_order_release);
    lock.unlock();
    {
      // Aborting ends NCCL's kernels, so the streams waiting on them move on.
      std::lock_guard<std::mutex> op_lock(mu_);
      if (comm_ != nullptr) {
        lib_->CommAbort(static_cast<ncclComm_t>(comm_));
        comm_ = nullptr;
      }
    }
    lock.lock();
  }
}

void NcclTransport::stop_watchdog() {
  {
    std::lock_guard<std::mutex> lock(wd_mu_);
    wd_stop_ = true;
  }
  wd_cv_.notify_all();
  if (wd_.joinable()) wd_.join();
  std::lock_guard<std::mutex> lock(wd_mu_);
  for (auto& f : inflight_) event_pool_.push_back(f.event);
  inflight_.clear();
  for (void* e : event_pool_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
  event_pool_.clear();
}

void NcclTransport::close(bool abort) {
  stop_watchdog();
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  closed_ = true;
  if (comm_ != nullptr) {
    auto comm = static_cast<ncclComm_t>(comm_);
    comm_ = nullptr;
    if (abort) {
      lib_->CommAbort(comm);
    } else {
      GF_CHECK_NCCL(*lib_, lib_->CommDestroy(comm));
    }
  }
}

}  // namespace gfcoll
