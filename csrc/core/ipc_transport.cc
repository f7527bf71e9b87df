// ipc transport; the protocol is Note [ipc signalling] in gfcoll/ipc_transport.h.
#include "gfcoll/ipc_transport.h"
#include "gfcoll/proc.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "../kernels/ipc.h"

namespace gfcoll {

namespace {

constexpr uint64_t kAlign = 256;
uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Stream memory operations, from the driver through the runtime (no link against libcuda).
struct MemOps {
  PFN_cuStreamWaitValue32_v11070 wait32 = nullptr;
  std::string error;
};

const MemOps& memops() {
  static MemOps ops = [] {
    MemOps m;
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &status);
    if (e != cudaSuccess || status != cudaDriverEntryPointSuccess || fn == nullptr) {
      m.error = std::string("cuStreamWaitValue32 is not available from the driver: ") + cudaGetErrorString(e);
    } else {
      m.wait32 = reinterpret_cast<PFN_cuStreamWaitValue32_v11070>(fn);
    }
    return m;
  }();
  return ops;
}

bool pid_alive(int64_t pid) { return process_alive(pid); }

std::string ranks_text(const std::vector<int>& r) {
  std::string s = "[";
  for (size_t i = 0; i < r.size(); ++i) s += (i ? ", " : "") + std::to_string(r[i]);
  return s + "]";
}

}  // namespace

IpcTransport::IpcTransport(int rank, int device, int num_local, IpcOptions options)
    : rank_(rank), device_(device), options_(options) {
  GF_ASSERT(num_local >= 1 && num_local <= ipc::kMaxLocal, kUnsupported, "ipc transport: ", num_local,
            " ranks on this node; at most ", ipc::kMaxLocal, " can share ipc workspaces");
  GF_ASSERT(memops().wait32 != nullptr, kUnsupported, "ipc transport: ", memops().error);
  num_local_ = num_local;
  // Ordered subsets of size k of L ranks: L! / (L - k)!.
  channel_base_.assign(num_local + 2, 0);
  for (int k = 1; k <= num_local; ++k) {
    uint64_t arrangements = 1;
    for (int i = 0; i < k; ++i) arrangements *= static_cast<uint64_t>(num_local - i);
    channel_base_[k + 1] = channel_base_[k] + arrangements;
  }
  num_group_channels_ = channel_base_[num_local + 1];
  num_channels_ = num_group_channels_ + ipc::kMaxSlots;
  const ipc::Layout lay = ipc::layout(num_channels_);
  signal_begin_ = lay.signal_begin;
  signal_end_ = lay.signal_end;
  counters_ = lay.counters;
  infos_ = lay.infos;
  GF_ASSERT(options_.workspace_bytes >= lay.staging + (4ull << 20), kInvalidArgument,
            "ipc transport: GFCOLL_IPC_BYTES=", options_.workspace_bytes, " is too small; at least ",
            lay.staging + (4ull << 20), " bytes are needed for ", num_local, " local ranks");
  ws_bytes_ = options_.workspace_bytes / kAlign * kAlign;
  const uint64_t staging = ws_bytes_ - lay.staging;
  // The top quarter of the staging area is the arena of operations captured in CUDA graphs; the
  // rest is a ring shared by eager operations, a quarter at most per operation (or chunk), so that
  // a few operations can be in flight before one waits for another's staging.
  arena_end_ = ws_bytes_;
  arena_begin_ = ws_bytes_ - staging / 4 / kAlign * kAlign;
  ring_begin_ = ring_head_ = lay.staging;
  ring_end_ = arena_begin_;
  chunk_cap_ = std::max<uint64_t>(kAlign, (ring_end_ - ring_begin_) / 4 / kAlign * kAlign);
  channel_last_.assign(num_channels_, {nullptr, 0});
  GF_CHECK_CUDA(cudaSetDevice(device_));
  void* p = nullptr;
  GF_CHECK_CUDA(cudaMalloc(&p, ws_bytes_));
  ws_ = static_cast<char*>(p);
  GF_CHECK_CUDA(cudaMemset(ws_, 0, lay.staging));
}

IpcTransport::~IpcTransport() {
  // close() is the explicit teardown; only make sure the watchdog thread does not outlive us.
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

std::string IpcTransport::handle() const {
  GF_ASSERT(ws_ != nullptr, kInvalidArgument, "ipc transport: handle() before the workspace exists");
  cudaIpcMemHandle_t h;
  GF_CHECK_CUDA(cudaIpcGetMemHandle(&h, ws_));
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

uint64_t IpcTransport::channel_of(const int32_t* locals, int n) const {
  // Rank of the ordered tuple among the ordered subsets of {0..L-1} of its size, after all smaller
  // sizes: a collision-free index.
  uint64_t idx = 0;
  unsigned used = 0;
  for (int p = 0; p < n; ++p) {
    int digit = 0;
    for (int v = 0; v < locals[p]; ++v) digit += !((used >> v) & 1u);
    idx = idx * static_cast<uint64_t>(num_local_ - p) + static_cast<uint64_t>(digit);
    used |= 1u << locals[p];
  }
  return channel_base_[n] + idx;
}

void IpcTransport::attach(const std::vector<int>& local_ranks, const std::vector<std::string>& handles,
                          const std::vector<int64_t>& pids) {
  GF_ASSERT(!attached_, kInvalidArgument, "ipc transport: attach() twice");
  GF_ASSERT(ws_ != nullptr, kInvalidArgument, "ipc transport: attach() before the workspace exists");
  const int L = static_cast<int>(local_ranks.size());
  GF_ASSERT(L == num_local_, kInvalidArgument, "ipc transport: attach with ", L, " local ranks, made for ",
            num_local_);
  GF_ASSERT(handles.size() == local_ranks.size() && pids.size() == local_ranks.size(), kInvalidArgument,
            "ipc transport: attach needs one handle and pid per local rank");
  global_of_ = local_ranks;
  int max_rank = 0;
  for (int r : local_ranks) max_rank = std::max(max_rank, r);
  local_of_.assign(std::max(max_rank + 1, rank_ + 1), -1);
  for (int i = 0; i < L; ++i) local_of_[local_ranks[i]] = i;
  my_local_ = local_of_[rank_];
  GF_ASSERT(my_local_ >= 0, kInvalidArgument, "ipc transport: rank ", rank_, " is not among the local ranks");
  pids_ = pids;
  peer_bases_.assign(L, nullptr);
  GF_CHECK_CUDA(cudaSetDevice(device_));
  for (int i = 0; i < L; ++i) {
    if (i == my_local_) {
      peer_bases_[i] = ws_;
      continue;
    }
    GF_ASSERT(handles[i].size() == sizeof(cudaIpcMemHandle_t), kInvalidArgument, "ipc transport: bad handle size");
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[i].data(), sizeof(h));
    void* p = nullptr;
    cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      cudaGetLastError();
      GF_THROW(kCuda, "ipc transport: rank ", rank_, " cannot open the workspace of rank ", local_ranks[i], ": ",
               cudaGetErrorName(e), ": ", cudaGetErrorString(e));
    }
    peer_bases_[i] = static_cast<char*>(p);
  }
  uint64_t bases[ipc::kMaxLocal] = {};
  for (int i = 0; i < L; ++i) bases[i] = reinterpret_cast<uint64_t>(peer_bases_[i]);
  GF_CHECK_CUDA(cudaMemcpy(ws_ + offsetof(ipc::Control, peer_bases), bases, sizeof(bases), cudaMemcpyHostToDevice));
  send_seq_.assign(L, 0);
  recv_seq_.assign(L, 0);
  pair_last_.assign(2 * L, {nullptr, 0});
  ipc::preload_kernels();  // Note [ipc signalling], "Loading"
  GF_CHECK_CUDA(cudaStreamCreateWithFlags(&wd_stream_, cudaStreamNonBlocking));
  GF_CHECK_CUDA(cudaEventCreateWithFlags(&release_event_, cudaEventDisableTiming));
  GF_CHECK_CUDA(cudaHostAlloc(&abort_host_, signal_end_ - signal_begin_, cudaHostAllocDefault));
  std::memset(abort_host_, ipc::kAbortByte, signal_end_ - signal_begin_);
  attached_ = true;
  watchdog_ = std::thread([this] { watchdog(); });
}

void IpcTransport::close() {
  if (closed_.exchange(true)) return;
  cudaSetDevice(device_);
  // Outstanding operations must not write into memory that is about to go away: wait for them, for
  // at most GFCOLL_TIMEOUT_S in all, with the watchdog still running (it times out a blocked one and
  // keeps releasing a failed transport's waits meanwhile). An operation still blocked at the bound
  // keeps everything it may touch: the workspace, the peers' mappings, the events and the
  // watchdog's stream are left to process exit (abandoned()).
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(options_.timeout_s));
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!pending_.empty() && cudaEventQuery(pending_.front().event) == cudaSuccess) {
        event_pool_.push_back(pending_.front().event);
        pending_.pop_front();
      }
      cudaGetLastError();
      if (pending_.empty()) break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      abandoned_ = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling a bounded wait
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  if (abandoned_) return;
  for (auto& r : pending_) cudaEventDestroy(r.event);
  pending_.clear();
  for (auto e : event_pool_) cudaEventDestroy(e);
  event_pool_.clear();
  for (size_t i = 0; i < peer_bases_.size(); ++i) {
    // A dead peer's mapping is left to process exit: its exporter is gone.
    if (static_cast<int>(i) != my_local_ && peer_bases_[i] != nullptr && pid_alive(pids_[i])) {
      cudaIpcCloseMemHandle(peer_bases_[i]);
    }
  }
  peer_bases_.clear();
  if (ws_ != nullptr) cudaFree(ws_);
  ws_ = nullptr;
  if (wd_stream_ != nullptr) {
    cudaStreamSynchronize(wd_stream_);
    cudaStreamDestroy(wd_stream_);
  }
  wd_stream_ = nullptr;
  if (release_event_ != nullptr) cudaEventDestroy(release_event_);
  release_event_ = nullptr;
  if (abort_host_ != nullptr) cudaFreeHost(abort_host_);
  abort_host_ = nullptr;
  cudaGetLastError();
}

bool IpcTransport::is_local(int rank) const {
  return attached_ && rank >= 0 && rank < static_cast<int>(local_of_.size()) && local_of_[rank] >= 0;
}

void IpcTransport::check() const {
  if (!failed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(mu_);
  throw Error(error_code_, "ipc watchdog", error_);
}

void IpcTransport::check_usable() const {
  GF_ASSERT(!closed_.load(std::memory_order_relaxed), kClosed, "the gfcoll world was closed");
  GF_ASSERT(attached_, kInvalidArgument, "ipc transport not attached");
  check();
}

IpcTransport::Group IpcTransport::resolve(const std::vector<int>& members, int me, int slot, const char* what) const {
  check_usable();
  Group g;
  if (slot >= 0) {
    GF_ASSERT(slot < static_cast<int>(slot_sizes_.size()), kInvalidArgument, what, ": unknown graph slot ", slot);
    g.n = slot_sizes_[slot];
    g.me = 0;
    g.slot = slot;
    g.channel = static_cast<int>(num_group_channels_) + slot;
    g.ranks = slot_ranks_[slot];
    return g;
  }
  const int n = static_cast<int>(members.size());
  GF_ASSERT(n >= 1 && n <= num_local_, kInvalidArgument, what, ": bad group size ", n);
  GF_ASSERT(me >= 0 && me < n && members[me] == rank_, kInvalidArgument, what, ": rank ", rank_,
            " is not member ", me, " of the group");
  g.n = n;
  g.me = me;
  for (int j = 0; j < n; ++j) {
    const int r = members[j];
    GF_ASSERT(r >= 0 && r < static_cast<int>(local_of_.size()) && local_of_[r] >= 0, kUnsupported, what,
              ": rank ", r, " is not on this node (ipc needs every member local)");
    g.members[j] = local_of_[r];
  }
  g.channel = static_cast<int>(channel_of(g.members, n));
  g.ranks = members;
  check_alive(g.members, n, what, members);
  return g;
}

void IpcTransport::check_alive(const int32_t* locals, int n, const char* what, const std::vector<int>& ranks) const {
  // Never enqueue work that would touch a dead peer's workspace: its exporter is gone.
  const uint32_t dead = dead_mask_.load(std::memory_order_relaxed);
  if (dead == 0) return;
  for (int j = 0; j < n; ++j) {
    GF_ASSERT(!((dead >> locals[j]) & 1u), kPeerDied, what, " on group ", ranks_text(ranks), ": rank ",
              global_of_[locals[j]], " (pid ", pids_[locals[j]], ") died");
  }
}

void IpcTransport::fill_ctx(const Group& g, void* out) const {
  auto& c = *static_cast<ipc::Ctx*>(out);
  c.ws = ws_;
  c.table = g.slot >= 0 ? reinterpret_cast<const ipc::Table*>(ws_ + offsetof(ipc::Control, tables) +
                                                              g.slot * sizeof(ipc::Table))
                        : nullptr;
  c.n = g.n;
  c.me = g.me;
  for (int j = 0; j < ipc::kMaxLocal; ++j) c.members[j] = j < g.n ? g.members[j] : 0;
  c.counters = counters_ + static_cast<uint64_t>(g.channel) * 4 * sizeof(uint32_t);
  c.info = infos_ + static_cast<uint64_t>(g.channel) * sizeof(ipc::ChannelInfo);
}

bool IpcTransport::record_done_locked(uint64_t id) {
  // Records are in id order; a record no longer pending has completed.
  if (pending_.empty() || id < pending_.front().id) return true;
  auto it = std::lower_bound(pending_.begin(), pending_.end(), id,
                             [](const Record& r, uint64_t v) { return r.id < v; });
  if (it == pending_.end() || it->id != id) return true;
  return cudaEventQuery(it->event) == cudaSuccess;
}

void IpcTransport::prune_locked() {
  // At most two event queries on the issuing path (each costs about a microsecond); the watchdog
  // drops the rest every few milliseconds.
  for (int k = 0; k < 2 && !pending_.empty(); ++k) {
    Record& r = pending_.front();
    if (cudaEventQuery(r.event) != cudaSuccess) break;
    event_pool_.push_back(r.event);
    pending_.pop_front();
  }
  cudaGetLastError();  // a not-ready query leaves no error, but be sure
}

IpcTransport::Issue IpcTransport::begin(const Group& g, uint64_t bytes, uintptr_t stream_, const char* what) {
  Issue is{as_stream(stream_), false, ring_begin_, bytes};
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  GF_CHECK_CUDA(cudaStreamGetCaptureInfo(is.stream, &cs));
  is.capturing = cs != cudaStreamCaptureStatusNone;
  const uint64_t size = align_up(std::max<uint64_t>(bytes, 1), kAlign);
  if (is.capturing) {
    // Note [ipc signalling], "Staging of captured operations": every captured operation stages at
    // the start of the graph arena, which the eager ring never touches.
    GF_ASSERT(size <= arena_end_ - arena_begin_, kUnsupported, what, ": needs ", bytes,
              " bytes of ipc staging in a CUDA graph, more than the graph arena's ", arena_end_ - arena_begin_,
              " (a quarter of GFCOLL_IPC_BYTES; raise it)");
    is.staging = arena_begin_;
    return is;
  }
  GF_ASSERT(size <= ring_end_ - ring_begin_, kUnsupported, what, ": needs ", bytes,
            " bytes of ipc staging, more than the workspace's ", ring_end_ - ring_begin_, " (raise GFCOLL_IPC_BYTES)");
  std::lock_guard<std::mutex> lock(mu_);
  prune_locked();
  // Same channel on another stream: wait for its last operation (one group's epochs stay ordered).
  auto& last = channel_last_[g.channel];
  if (last.second != 0 && last.first != is.stream && !record_done_locked(last.second)) {
    auto it = std::lower_bound(pending_.begin(), pending_.end(), last.second,
                               [](const Record& r, uint64_t v) { return r.id < v; });
    GF_CHECK_CUDA(cudaStreamWaitEvent(is.stream, it->event, 0));
  }
  if (bytes == 0) return is;
  if (ring_head_ + size > ring_end_) ring_head_ = ring_begin_;
  is.staging = ring_head_;
  ring_head_ += size;
  // Staging still used by an operation in flight on another stream: wait for it first.
  for (auto& r : pending_) {
    if (r.end > is.staging && r.begin < is.staging + size && r.stream != is.stream &&
        cudaEventQuery(r.event) != cudaSuccess) {
      GF_CHECK_CUDA(cudaStreamWaitEvent(is.stream, r.event, 0));
    }
  }
  cudaGetLastError();
  return is;
}

void IpcTransport::end(const Group& g, const Issue& is, const char* what) {
  if (is.capturing) return;
  std::lock_guard<std::mutex> lock(mu_);
  cudaEvent_t ev;
  if (event_pool_.empty()) {
    GF_CHECK_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  } else {
    ev = event_pool_.back();
    event_pool_.pop_back();
  }
  GF_CHECK_CUDA(cudaEventRecord(ev, is.stream));
  Record r;
  r.id = next_id_++;
  r.event = ev;
  r.stream = is.stream;
  r.begin = is.staging;
  r.end = is.bytes ? is.staging + align_up(is.bytes, kAlign) : is.staging;
  r.deadline = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double>(options_.timeout_s));
  for (int j = 0; j < g.n; ++j) {
    if (g.slot < 0 && j != g.me) r.peers.push_back(g.members[j]);
  }
  if (g.slot >= 0) {
    for (int rk : g.ranks) {
      if (rk != rank_ && is_local(rk)) r.peers.push_back(local_of_[rk]);
    }
  }
  r.what = what;
  r.ranks = g.ranks;
  if (g.channel >= 0) channel_last_[g.channel] = {is.stream, r.id};
  pending_.push_back(std::move(r));
}

void IpcTransport::wait_word(cudaStream_t stream, uint64_t offset, uint32_t value) {
  CUresult res = memops().wait32(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(ws_ + offset),
                                 value, CU_STREAM_WAIT_VALUE_GEQ);
  GF_ASSERT(res == CUDA_SUCCESS, kCuda, "cuStreamWaitValue32 failed with CUresult ", static_cast<int>(res));
}

void IpcTransport::wait_counter(const Group& g, const Issue& is, int phase) {
  wait_word(is.stream, counters_ + static_cast<uint64_t>(g.channel) * 4 * sizeof(uint32_t) + phase * 4,
            static_cast<uint32_t>(g.n - 1));
}

namespace {
ipc::Seg seg_raw_to_staging(const void* src, uint64_t dst_add, uint64_t bytes) {
  ipc::Seg s{};
  s.src = static_cast<const char*>(src);
  s.dst_add = dst_add;
  s.bytes = bytes;
  s.src_member = -1;
  s.dst_staging = 1;
  return s;
}
ipc::Seg seg_member_to_raw(int member, uint64_t src_add, bool aux, void* dst, uint64_t bytes) {
  ipc::Seg s{};
  s.src_member = member;
  s.src_add = src_add;
  s.src_aux = aux ? 1 : 0;
  s.dst = static_cast<char*>(dst);
  s.bytes = bytes;
  return s;
}
}  // namespace

void IpcTransport::all_gather(const std::vector<int>& members, int me, const void* in, void* out, uint64_t bytes,
                              uintptr_t stream, int slot) {
  Group g = resolve(members, me, slot, "all_gather");
  if (bytes == 0) return;
  char* dst = static_cast<char*>(out);
  if (g.n == 1 && slot < 0) {
    if (dst != in) GF_CHECK_CUDA(cudaMemcpyAsync(dst, in, bytes, cudaMemcpyDeviceToDevice, as_stream(stream)));
    return;
  }
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  for (uint64_t a = 0; a < bytes; a += chunk_cap_) {
    const uint64_t len = std::min(chunk_cap_, bytes - a);
    Issue is = begin(g, len, stream, "all_gather");
    ipc::Segs st{};
    st.s[0] = seg_raw_to_staging(static_cast<const char*>(in) + a, 0, len);
    st.num = 1;
    st.publish = 1;
    st.staging = is.staging;
    ipc::launch_copy(ctx, st, ipc::Finish{-1, 0, 1}, is.stream);
    wait_counter(g, is, 0);
    ipc::Segs ga{};
    for (int j = 0; j < g.n; ++j) ga.s[j] = seg_member_to_raw(j, 0, false, dst + j * bytes + a, len);
    ga.num = g.n;
    ipc::launch_copy(ctx, ga, ipc::Finish{0, 2, 0}, is.stream);
    wait_counter(g, is, 2);
    end(g, is, "all_gather");
  }
}

void IpcTransport::broadcast(const std::vector<int>& members, int me, int root_index, void* buf, uint64_t bytes,
                             uintptr_t stream, int slot) {
  Group g = resolve(members, me, slot, "broadcast");
  GF_ASSERT(root_index >= 0 && root_index < g.n, kInvalidArgument, "broadcast: bad root index ", root_index);
  if (bytes == 0 || g.n == 1) return;
  const bool root_known = slot < 0;
  const bool is_root = root_known && g.me == root_index;
  char* data = static_cast<char*>(buf);
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  for (uint64_t a = 0; a < bytes; a += chunk_cap_) {
    const uint64_t len = std::min(chunk_cap_, bytes - a);
    // On a graph slot this rank's index is known at replay only: every member stages, and the
    // root copies its own bytes back (unchanged).
    Issue is = begin(g, (is_root || !root_known) ? len : 0, stream, "broadcast");
    ipc::Segs st{};
    if (is_root || !root_known) {
      st.s[0] = seg_raw_to_staging(data + a, 0, len);
      st.num = 1;
    }
    st.publish = 1;
    st.staging = is.staging;
    ipc::launch_copy(ctx, st, ipc::Finish{-1, 0, 1}, is.stream);
    wait_counter(g, is, 0);
    ipc::Segs ga{};
    if (!is_root) {
      ga.s[0] = seg_member_to_raw(root_index, 0, false, data + a, len);
      ga.num = 1;
    }
    ipc::launch_copy(ctx, ga, ipc::Finish{0, 2, 0}, is.stream);
    wait_counter(g, is, 2);
    end(g, is, "broadcast");
  }
}

void IpcTransport::reduce_scatter(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                                  DType dtype, RedOp op, uintptr_t stream, int slot) {
  Group g = resolve(members, me, slot, "reduce_scatter");
  check_reduction(dtype, op);
  if (count == 0) return;
  const uint64_t es = dtype_size(dtype);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  const uint64_t per_chunk = std::max<uint64_t>(1, chunk_cap_ / (es * g.n));
  for (uint64_t a = 0; a < count; a += per_chunk) {
    const uint64_t len = std::min(per_chunk, count - a);
    Issue is = begin(g, len * es * g.n, stream, "reduce_scatter");
    ipc::Segs st{};
    for (int j = 0; j < g.n; ++j) st.s[j] = seg_raw_to_staging(src + (j * count + a) * es, j * len * es, len * es);
    st.num = g.n;
    st.publish = 1;
    st.staging = is.staging;
    ipc::launch_copy(ctx, st, ipc::Finish{-1, 0, 1}, is.stream);
    if (g.n > 1) wait_counter(g, is, 0);
    ipc::launch_reduce(ctx, dtype, op, ipc::ReduceMode::kBlock, dst + a * es, len, ipc::Finish{0, 2, 0}, is.stream);
    if (g.n > 1) wait_counter(g, is, 2);
    end(g, is, "reduce_scatter");
  }
}

void IpcTransport::all_reduce(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                              DType dtype, RedOp op, uintptr_t stream, int slot) {
  Group g = resolve(members, me, slot, "all_reduce");
  check_reduction(dtype, op);
  if (count == 0) return;
  const uint64_t es = dtype_size(dtype);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  const bool one_shot = count * es <= options_.one_shot_bytes || g.n <= 2;
  const uint64_t per_chunk = std::max<uint64_t>(1, chunk_cap_ / es);
  for (uint64_t a = 0; a < count; a += per_chunk) {
    const uint64_t len = std::min(per_chunk, count - a);
    Issue is = begin(g, len * es, stream, "all_reduce");
    ipc::Segs st{};
    st.s[0] = seg_raw_to_staging(src + a * es, 0, len * es);
    st.num = 1;
    st.publish = 1;
    st.staging = is.staging;
    ipc::launch_copy(ctx, st, ipc::Finish{-1, 0, 1}, is.stream);
    if (g.n > 1) wait_counter(g, is, 0);
    if (one_shot) {
      // Every member reduces everything: one round, n - 1 reads per element per member.
      ipc::launch_reduce(ctx, dtype, op, ipc::ReduceMode::kAll, dst + a * es, len, ipc::Finish{0, 2, 0}, is.stream);
    } else {
      // Two-shot: member j reduces part j (written back into its staging), then every member
      // gathers the parts: each byte crosses each link twice instead of n - 1 times.
      ipc::launch_reduce(ctx, dtype, op, ipc::ReduceMode::kPart, dst + a * es, len, ipc::Finish{0, 1, 0},
                         is.stream);
      wait_counter(g, is, 1);
      const uint64_t part = (len + g.n - 1) / g.n;
      ipc::Segs ga{};
      for (int j = 0; j < g.n; ++j) {
        const uint64_t f = std::min(len, part * j), l = std::min(len, part * (j + 1)) - f;
        ga.s[j] = seg_member_to_raw(j, f * es, false, dst + (a + f) * es, l * es);
      }
      ga.num = g.n;
      ipc::launch_copy(ctx, ga, ipc::Finish{1, 2, 0}, is.stream);
    }
    if (g.n > 1) wait_counter(g, is, 2);
    end(g, is, "all_reduce");
  }
}

void IpcTransport::all_to_all(const std::vector<int>& members, int me, const void* in, void* out,
                              const std::vector<uint64_t>& in_offsets, const std::vector<uint64_t>& in_sizes,
                              const std::vector<uint64_t>& out_offsets, const std::vector<uint64_t>& out_sizes,
                              uintptr_t stream, int slot) {
  Group g = resolve(members, me, slot, "all_to_all");
  const size_t n = static_cast<size_t>(g.n);
  GF_ASSERT(in_offsets.size() == n && in_sizes.size() == n && out_offsets.size() == n && out_sizes.size() == n,
            kInvalidArgument, "all_to_all: split lists must have one entry per member");
  uint64_t span = 0;
  for (size_t j = 0; j < n; ++j) span = std::max(span, in_offsets[j] + in_sizes[j]);
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  // The whole input is staged at once (members cannot agree on a number of rounds without
  // communicating, since each knows only its own splits); GFCOLL_IPC_BYTES bounds it.
  Issue is = begin(g, span, stream, "all_to_all");
  ipc::Segs st{};
  if (span > 0) {
    st.s[0] = seg_raw_to_staging(in, 0, span);
    st.num = 1;
  }
  st.publish = 1;
  st.staging = is.staging;
  for (size_t j = 0; j < n; ++j) st.aux[j] = in_offsets[j];
  ipc::launch_copy(ctx, st, ipc::Finish{-1, 0, 1}, is.stream);
  if (n > 1) wait_counter(g, is, 0);
  ipc::Segs ga{};
  for (size_t j = 0; j < n; ++j) {
    ga.s[j] = seg_member_to_raw(static_cast<int>(j), 0, true, static_cast<char*>(out) + out_offsets[j], out_sizes[j]);
  }
  ga.num = static_cast<int>(n);
  ipc::launch_copy(ctx, ga, ipc::Finish{0, 2, 0}, is.stream);
  if (n > 1) wait_counter(g, is, 2);
  end(g, is, "all_to_all");
}

void IpcTransport::barrier(const std::vector<int>& members, int me, uintptr_t stream, int slot) {
  barrier_group(resolve(members, me, slot, "barrier"), stream);
}

void IpcTransport::barrier_group(const Group& g, uintptr_t stream) {
  if (g.n == 1) return;
  ipc::Ctx ctx;
  fill_ctx(g, &ctx);
  Issue is = begin(g, 0, stream, "barrier");
  ipc::Segs none{};
  none.publish = 1;
  none.staging = is.staging;
  ipc::launch_copy(ctx, none, ipc::Finish{-1, 0, 1}, is.stream);
  wait_counter(g, is, 0);
  ipc::Segs none2{};
  ipc::launch_copy(ctx, none2, ipc::Finish{0, 2, 0}, is.stream);
  wait_counter(g, is, 2);
  end(g, is, "barrier");
}

void IpcTransport::batch_p2p(const std::vector<IpcP2P>& ops, uintptr_t stream_) {
  check_usable();
  if (ops.empty()) return;
  for (const auto& x : ops) {
    GF_ASSERT(x.peer != rank_ && is_local(x.peer), kUnsupported, "p2p: rank ", x.peer,
              " is not a local peer of rank ", rank_, " (ipc needs both on this node)");
  }
  {
    std::vector<int32_t> locals;
    std::vector<int> ranks;
    for (const auto& x : ops) {
      locals.push_back(local_of_[x.peer]);
      ranks.push_back(x.peer);
    }
    check_alive(locals.data(), static_cast<int>(locals.size()), "batch_p2p", ranks);
  }
  cudaStream_t stream = as_stream(stream_);
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  GF_CHECK_CUDA(cudaStreamIsCapturing(stream, &cs));
  GF_ASSERT(cs == cudaStreamCaptureStatusNone, kUnsupported,
            "p2p on the ipc transport cannot be captured in a CUDA graph (sequence numbers would be baked in)");
  // All sends' staging as one region.
  uint64_t total = 0;
  for (const auto& x : ops) {
    if (x.is_send) total += align_up(std::max<uint64_t>(x.bytes, 1), kAlign);
  }
  Group g;  // no channel: p2p orders itself by (pair, seq)
  g.n = 1;
  g.channel = -1;
  Issue is{stream, false, ring_begin_, total};
  {
    GF_ASSERT(total <= ring_end_ - ring_begin_, kUnsupported, "batch_p2p: needs ", total,
              " bytes of ipc staging, more than the workspace's ", ring_end_ - ring_begin_,
              " (raise GFCOLL_IPC_BYTES)");
    std::lock_guard<std::mutex> lock(mu_);
    prune_locked();
    if (total > 0) {
      if (ring_head_ + total > ring_end_) ring_head_ = ring_begin_;
      is.staging = ring_head_;
      ring_head_ += total;
      for (auto& r : pending_) {
        if (r.end > is.staging && r.begin < is.staging + total && r.stream != stream &&
            cudaEventQuery(r.event) != cudaSuccess) {
          GF_CHECK_CUDA(cudaStreamWaitEvent(stream, r.event, 0));
        }
      }
      cudaGetLastError();
    }
  }
  struct Item {
    bool send;
    int local;
    uint32_t seq;
    const IpcP2P* op;
    uint64_t staging;
  };
  std::vector<Item> items;
  std::vector<int> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t off = is.staging;
    for (const auto& x : ops) {
      const int l = local_of_[x.peer];
      Item it{x.is_send, l, x.is_send ? send_seq_[l]++ : recv_seq_[l]++, &x, 0};
      if (x.is_send) {
        it.staging = off;
        off += align_up(std::max<uint64_t>(x.bytes, 1), kAlign);
      }
      items.push_back(it);
      if (std::find(peers.begin(), peers.end(), l) == peers.end()) peers.push_back(l);
    }
  }
  const uint64_t ready = offsetof(ipc::Control, p2p_ready), done = offsetof(ipc::Control, p2p_done);
  auto word = [](uint64_t base, int local, uint32_t seq) {
    return base + (static_cast<uint64_t>(local) * ipc::kP2PDepth + seq % ipc::kP2PDepth) * sizeof(uint32_t);
  };
  for (const auto& it : items) {
    if (!it.send) continue;
    // The message slot is free once the message kP2PDepth before this one was read.
    if (it.seq >= static_cast<uint32_t>(ipc::kP2PDepth)) {
      wait_word(stream, word(done, it.local, it.seq), it.seq - ipc::kP2PDepth + 1);
    }
    ipc::launch_p2p_send(ws_, my_local_, it.local, it.seq, it.op->ptr, it.staging, it.op->bytes, stream);
  }
  for (const auto& it : items) {
    if (it.send) continue;
    wait_word(stream, word(ready, it.local, it.seq), it.seq + 1);
    ipc::launch_p2p_recv(ws_, my_local_, it.local, it.seq, it.op->ptr, it.op->bytes, stream);
  }
  for (const auto& it : items) {
    if (it.send) wait_word(stream, word(done, it.local, it.seq), it.seq + 1);
  }
  g.ranks.clear();
  for (int l : peers) g.ranks.push_back(global_of_[l]);
  // Liveness of the peers: end() takes group members; give it the peers as a pseudo group.
  Group pg;
  pg.n = static_cast<int>(peers.size()) + 1;
  pg.me = pg.n - 1;
  for (size_t k = 0; k < peers.size(); ++k) pg.members[k] = peers[k];
  pg.members[pg.me] = my_local_;
  pg.channel = -1;
  pg.ranks = g.ranks;
  end(pg, is, "batch_p2p");
}

int IpcTransport::graph_slot(int size) {
  check_usable();
  GF_ASSERT(size >= 1 && size <= num_local_, kInvalidArgument, "graph_slot: size ", size,
            " must be between 1 and the node's ", num_local_, " ranks");
  std::lock_guard<std::mutex> lock(mu_);
  GF_ASSERT(static_cast<int>(slot_sizes_.size()) < ipc::kMaxSlots, kUnsupported, "graph_slot: at most ",
            ipc::kMaxSlots, " slots per world");
  slot_sizes_.push_back(size);
  slot_ranks_.emplace_back();
  return static_cast<int>(slot_sizes_.size()) - 1;
}

void IpcTransport::bind(int slot, const std::vector<int>& members, int me, int epoch, uintptr_t stream) {
  Group g = resolve(members, me, -1, "bind");
  GF_ASSERT(slot >= 0 && slot < static_cast<int>(slot_sizes_.size()), kInvalidArgument, "bind: unknown slot ", slot);
  GF_ASSERT(g.n == slot_sizes_[slot], kInvalidArgument, "bind: the slot has ", slot_sizes_[slot],
            " members, the group ", g.n);
  ipc::Table t{};
  t.n = g.n;
  t.me = g.me;
  t.epoch = epoch;
  for (int j = 0; j < g.n; ++j) t.members[j] = g.members[j];
  ipc::launch_bind(ws_, slot, t, as_stream(stream));
  {
    std::lock_guard<std::mutex> lock(mu_);
    slot_ranks_[slot] = members;
  }
  // A barrier of the new group on its own channel: once it passes, every new partner finished
  // (in stream order) its earlier use of the slot, possibly with other partners, so no arrival of
  // an old epoch can mix with the new group's in the slot's counters (Note [ipc signalling]).
  barrier_group(g, stream);
}

void IpcTransport::fail(ErrorCode code, const std::string& message) {
  // Called by the watchdog with mu_ held.
  if (!failed_.load()) {
    error_code_ = code;
    error_ = message;
    failed_.store(true, std::memory_order_release);
  }
  // Release every stream wait of this rank: the abort word and all counters and p2p words, copied
  // from pinned host memory by a copy engine (not a memset kernel, which would queue behind the
  // blocked work it is meant to release). Never waited for: the watchdog holds mu_ here; the next
  // copy is issued once this one finished, for as long as operations stay in flight.
  if (release_pending_ && cudaEventQuery(release_event_) == cudaErrorNotReady) return;
  cudaMemcpyAsync(ws_ + signal_begin_, abort_host_, signal_end_ - signal_begin_, cudaMemcpyHostToDevice, wd_stream_);
  cudaEventRecord(release_event_, wd_stream_);
  release_pending_ = true;
  cudaGetLastError();
}

void IpcTransport::watchdog() {
  pthread_setname_np(pthread_self(), "gfcoll-ipc-wd");  // named in crash reports and debuggers
  cudaSetDevice(device_);
  // Event queries from this thread must not invalidate a CUDA graph another thread is capturing.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::milliseconds(5));
    if (stop_) break;
    // Drop finished operations (any order), then judge the oldest unfinished ones.
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (cudaEventQuery(it->event) == cudaSuccess) {
        event_pool_.push_back(it->event);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    cudaGetLastError();
    uint32_t dead = 0;
    for (int l = 0; l < num_local_; ++l) {
      if (l != my_local_ && !pid_alive(pids_[l])) dead |= 1u << l;
    }
    dead_mask_.store(dead, std::memory_order_relaxed);
    if (pending_.empty()) continue;
    if (failed_.load()) {
      fail(error_code_, error_);  // keep releasing waits until nothing is in flight
      continue;
    }
    const auto now = std::chrono::steady_clock::now();
    for (const auto& r : pending_) {
      int dead = -1;
      for (int l : r.peers) {
        if (!pid_alive(pids_[l])) {
          dead = l;
          break;
        }
      }
      if (dead >= 0) {
        // Plain string building: the watchdog thread uses no iostreams.
        fail(ErrorCode::kPeerDied, std::string(r.what) + " on group " + ranks_text(r.ranks) + ": rank " +
                                       std::to_string(global_of_[dead]) + " (pid " + std::to_string(pids_[dead]) +
                                       ") died");
        break;
      }
      if (now > r.deadline) {
        std::vector<int> waited;
        for (int l : r.peers) waited.push_back(global_of_[l]);
        char bound[32];
        std::snprintf(bound, sizeof(bound), "%g", options_.timeout_s);
        fail(ErrorCode::kTimeout, std::string(r.what) + " on group " + ranks_text(r.ranks) + ": rank " +
                                      std::to_string(rank_) + " gave up after GFCOLL_TIMEOUT_S=" + bound +
                                      " s waiting for ranks " + ranks_text(waited));
        break;
      }
    }
  }
}

}  // namespace gfcoll
