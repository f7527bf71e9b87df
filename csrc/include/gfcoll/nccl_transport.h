// NCCL transport: group-free collectives on CUDA memory over ONE global NCCL communicator.
//
// Note [nccl masked collectives]
// The communicator spans the whole world and is created once at init; a group is only a list of
// member ranks. A collective on a group is one fused ncclGroupStart/End of ncclSend/ncclRecv among
// its members (every member talks directly to every other: the same bytes on the wire as a ring,
// in one step), plus gfcoll's own reduction kernel (kernels/reduce.h) for reduce_scatter and
// all_reduce. Non-members issue nothing. All work is enqueued on the caller's stream.
//
// NCCL executes the operations of one communicator in the order each rank issued them, whatever
// the stream. So on this transport, two operations in flight at once on groups that share two or
// more ranks must be issued in the same relative order on those ranks, and concurrent operations
// must not be issued in a cyclic order (rank 0: A then B, rank 1: B then C, rank 2: C then A).
// Operations on groups that share at most one rank, issued by at most one shared rank, are free.
// NCCL communicators are not thread safe: calls are serialised by a mutex.
//
// Watchdog (start_watchdog): a thread polls ncclCommGetAsyncError and the completion event of
// every operation in flight; on an asynchronous error, or an operation older than the timeout, it
// aborts the communicator (ncclCommAbort ends NCCL's kernels and proxy) and records the error,
// which every later call raises (GfcollNcclError / GfcollTimeoutError). Operations captured in a
// CUDA graph are not watched (their replays are the graph's).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gfcoll/types.h"

namespace gfcoll {

struct NcclLib;

struct NcclP2P {
  bool is_send = false;
  int peer = -1;  // global rank
  void* ptr = nullptr;
  uint64_t bytes = 0;
};

class NcclTransport {
 public:
  // Loads libnccl: `library` if not empty, else the copy already loaded in the process (torch's),
  // else "libnccl.so.2" from the loader's search path.
  explicit NcclTransport(const std::string& library);
  ~NcclTransport();
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  static std::string default_library();
  std::string library_path() const;
  int version() const;  // e.g. 22809
  std::string unique_id() const;  // ncclUniqueId bytes, made on one rank and shared via the store

  // Collective over the world: every rank calls it with the same id. `device` is the CUDA ordinal.
  void init(int rank, int world_size, const std::string& id, int device);
  // Opens the connection to every peer (a 1-byte exchange with each), so that the first operation
  // on a never-seen group costs no more than later ones. Collective over the world; synchronous.
  void warmup();

  void all_gather(const std::vector<int>& members, int me, const void* in, void* out, uint64_t bytes,
                  uintptr_t stream);
  void all_to_all(const std::vector<int>& members, int me, const void* in, void* out,
                  const std::vector<uint64_t>& in_offsets, const std::vector<uint64_t>& in_sizes,
                  const std::vector<uint64_t>& out_offsets, const std::vector<uint64_t>& out_sizes,
                  uintptr_t stream);
  void reduce_scatter(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                      DType dtype, RedOp op, uintptr_t stream);
  void all_reduce(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                  DType dtype, RedOp op, uintptr_t stream);
  void broadcast(const std::vector<int>& members, int me, int root_index, void* buf, uint64_t bytes,
                 uintptr_t stream);
  void batch_p2p(const std::vector<NcclP2P>& ops, uintptr_t stream);

  // Raises if NCCL reported an asynchronous error (a peer failure, a network error).
  void check_async_error();
  // Starts the watchdog thread (see the note above); `timeout_s` bounds every operation.
  void start_watchdog(double timeout_s);
  // Raises the error the watchdog recorded, if any.
  void check() const;
  // Aborts outstanding work and frees the communicator. Local; safe to call twice.
  void close(bool abort = false);
  // Note [NCCL shrink] (gfcoll/nccl_shrink.py). The communicator as an integer (ncclComm_t), for the
  // shrink that gfcoll.nccl_shrink runs over the same library; 0 when there is none (not initialised,
  // closed, or aborted by the watchdog).
  uintptr_t comm_handle();
  // Replaces the communicator by `comm` (made from the current one by ncclCommShrink), in which global
  // rank g is rank comm_rank_of[g] (-1: not a member). Every later operation maps its peers through
  // it; the old communicator is aborted; a failure the watchdog recorded is cleared.
  void adopt(uintptr_t comm, const std::vector<int>& comm_rank_of);
  int device() const { return device_; }

 private:
  void check_ready() const;
  void check_members(const std::vector<int>& members, int me, const char* what) const;
  void track(void* stream);  // records the completion event of the operation just enqueued
  int peer(int global) const;  // the communicator rank of a global rank (Note [NCCL shrink])
  void watchdog();
  void stop_watchdog();

  std::unique_ptr<NcclLib> lib_;
  void* comm_ = nullptr;
  int rank_ = -1;
  int world_size_ = 0;
  std::vector<int> comm_rank_of_;  // global -> communicator rank after a shrink; empty: the identity
  int device_ = -1;
  bool closed_ = false;
  std::mutex mu_;

  struct InFlight {
    void* event;  // cudaEvent_t
    std::chrono::steady_clock::time_point deadline;
  };
  std::thread wd_;
  mutable std::mutex wd_mu_;  // the members below
  std::condition_variable wd_cv_;
  bool wd_stop_ = false;
  double timeout_s_ = 0;
  std::deque<InFlight> inflight_;
  std::vector<void*> event_pool_;
  std::atomic<bool> failed_{false};
  ErrorCode error_code_ = ErrorCode::kNccl;
  std::string error_;
};

}  // namespace gfcoll
