// ipc transport: group-free collectives on CUDA memory of the ranks of one node, through CUDA IPC.
//
// Note [ipc signalling]
// Every rank allocates one workspace (cudaMalloc, GFCOLL_IPC_BYTES) at init; its IPC handle goes
// through the bootstrap store and every local peer opens it once (never on the hot path). A
// workspace holds a control block (kernels/ipc.h: Control), the signal area, per-channel records
// and a staging area. Layouts are identical on every rank, so an offset names the same word in
// every workspace.
//
// Channels. Every ordered group of local ranks owns one channel, indexed without collisions (the
// rank of the ordered tuple among all ordered subsets of the node's ranks), and every graph slot
// owns one more. A channel is this rank's arrival counters, one per phase (0 staged, 1 reduced,
// 2 done), its last-block counters and the offsets it publishes (its staging, per-member aux).
//
// An operation on a group of n members is a sequence of phases on the group's channel, all
// enqueued on the caller's stream:
//   stage kernel   copies this rank's input into its staging (user tensors are never registered:
//                  the extra copy costs one pass over the input; the staging offset is published in
//                  the channel), resets counter 2 of the previous operation, and its last block adds
//                  one to counter 0 of every peer (atomicAdd_system after __threadfence_system);
//   wait           cuStreamWaitValue32(counter 0 >= n - 1) on this rank's own memory: a
//                  front-end wait of the stream, no kernel spins, so ranks time-sharing one GPU
//                  do not steal each other's time slices (a spinning kernel costs ~4.5 ms per round
//                  trip there, a stream wait ~9.6 us);
//   data kernel    reads the peers' staging (peer workspace + the staging offset they published),
//                  writes the output, resets counter 0 and signals counter 2 (or 1, then a second
//                  data kernel for the two-shot all_reduce resets 1 and signals 2);
//   wait           counter 2 >= n - 1: no peer still reads this rank's staging.
// Keying by (group, epoch): the group is the channel; the epoch is the position of an operation
// in the group's sequence (rule 1), and no explicit number is needed because a counter is reset
// by the kernel after its wait and before this rank's next signal on the channel, and a peer can
// only add to it again after it saw that signal (a full round trip). Counters therefore always
// hold arrivals of the current epoch only, which is also what lets a CUDA graph replay the same
// wait values forever. Operations of one group issued on two streams are ordered by an event
// (the second stream waits for the first's last operation on that channel); gfcoll adds no wait
// between operations on different groups, so overlapping groups on different streams progress
// independently (rule 3 does not apply to ipc operations).
//
// Loading. CUDA loads a kernel lazily, at its first launch, and that load may wait for the whole
// context to drain. A rank whose stream waits for a peer never drains, so the first launch of any
// kernel behind such a wait blocks the host; if the peer waits for this rank's other stream, or is
// silent, that is a deadlock the watchdog cannot see (nothing was recorded yet). Hence attach()
// loads every ipc kernel (preload_kernels). Before it did (one H200 2026-12-01, one H100
// 2026-12-05/06, ranks sharing the GPU), overlapping groups issued in opposite orders on two
// streams deadlocked (that test's first all_reduce of a second dtype is a first launch behind a
// waiting stream), and a silent peer's survivor hung in its first operation; with the kernels
// loaded at attach both tests pass (one H100, 2026-12-06, 2 and 4 ranks:
// bench/results/2026-12-06-h100-s7). The rule for callers is the general one: kernels that a
// rank launches behind a gfcoll wait should already be loaded (a warm-up step loads a model's).
//
// Point to point uses per ordered pair a ring of kP2PDepth message slots keyed by (pair, seq)
// (rule 4): the sender stages message seq, publishes its offset in mbox[dst][seq % depth] and
// writes seq + 1 into the receiver's ready word; the receiver waits for it, copies, and writes
// seq + 1 into the sender's done word; the sender waits for that before the staging is reused.
//
// Staging of captured operations. Captured staging is replayed later, so it must not be the eager
// ring's (a later eager operation would overwrite it between replays): captured operations use the
// graph arena, the top quarter of the staging area, and every one of them uses it from its start.
// That is safe because an operation's own last step waits until every peer has read this rank's
// staging (counter 2 above), so the next operation in stream order may overwrite it; the rule for
// callers is that gfcoll operations inside one capture are stream-ordered (one stream, or streams
// joined by events) and that graphs holding gfcoll operations replay one at a time per rank (the
// runtime replays denoising steps on one stream). One arena then serves any number of graphs, sized
// by the largest single operation, where a bump allocator kept for the life of the world ran out
// after one full-size DiT step (a 6-block flux-dev layout at 512² over 2 ranks needs ~113 MB of
// captured staging; the arena is 64 MiB at the default GFCOLL_IPC_BYTES).
//
// Group-agnostic graphs: the kernels find n, this rank's index and the members in a Ctx that is
// either launch arguments (eager groups) or, for a graph slot, a device-side Table that
// bind() rewrites on the stream before a replay. Waits are on this rank's own counters with
// values that depend on n only, signals are written by kernels that read the table, and staging
// captured in a graph comes from a separate arena that is never reused, so one graph replays for
// any group of the slot's size. Counters count arrivals without naming the sender, which is safe
// within one group (the round trip above) but not across a rebinding: a new partner could signal
// while this rank still runs the slot with its old partners. So bind() ends with a barrier of the
// new group on the group's own channel, enqueued on the stream: past it, every new partner has
// finished its earlier use of the slot.
//
// Bounded waits: stream waits have no timeout, so a host watchdog thread watches every operation
// in flight (a CUDA event per operation) and the liveness of its peers (their pids). When one
// passes GFCOLL_TIMEOUT_S or a peer died, it records the error, sets the abort word and fills the
// signal area with kAbortByte (which satisfies every wait) by a host-to-device copy (a copy
// engine: a memset kernel would queue behind the blocked work), again while operations remain in
// flight; kernels that see the abort word return without touching anything. The transport is
// then unusable: every later call raises the recorded GfcollTimeoutError/GfcollPeerDiedError.
// The watchdog also keeps a mask of dead local peers, and no operation with a dead member is
// enqueued (it raises GfcollPeerDiedError at once), so this rank's kernels do not touch the
// workspace of a process known to be gone. On one H100 (2026-12-05) the watchdog thread itself
// crashed (SIGSEGV in gfcoll-ipc-wd) whenever it failed the transport; on 2026-12-06 (H100, H200) a
// dead peer then ended the survivors' waits with GfcollPeerDiedError as designed once the watchdog
// formatted without iostreams, and a crash of the same kind in an ordinary error path (an error
// message built through std::ostringstream, faulting inside the stream's locale code) showed the
// cause was iostreams themselves on that build: no gfcoll native code uses them now (error.h).
// close() waits for operations in flight for at most GFCOLL_TIMEOUT_S, the watchdog still running;
// one still blocked then leaves the workspace and mappings to process exit (abandoned()).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gfcoll/types.h"

namespace gfcoll {

struct IpcOptions {
  uint64_t workspace_bytes = 256ull << 20;
  double timeout_s = 300.0;
  // all_reduce: at most this many bytes use the one-shot algorithm (every member reduces all of
  // it), larger ones the two-shot (reduce a part each, then gather). Not tuned on several GPUs yet.
  uint64_t one_shot_bytes = 256ull << 10;
};

struct IpcP2P {
  bool is_send = false;
  int peer = -1;  // global rank
  void* ptr = nullptr;
  uint64_t bytes = 0;
};

class IpcTransport {
 public:
  // Allocates this rank's workspace on `device` for `num_local` ranks on this node.
  IpcTransport(int rank, int device, int num_local, IpcOptions options);
  ~IpcTransport();
  IpcTransport(const IpcTransport&) = delete;
  IpcTransport& operator=(const IpcTransport&) = delete;

  // Bootstrap (Python, through the store): handle() on every rank; attach() with the node's ranks
  // in local order (global ranks), their handles and pids; this rank must be among them.
  std::string handle() const;
  void attach(const std::vector<int>& local_ranks, const std::vector<std::string>& handles,
              const std::vector<int64_t>& pids);
  // Local teardown: stops the watchdog, closes peers' handles, frees the workspace. Idempotent.
  void close();
  // After close(): true when an operation was still blocked at GFCOLL_TIMEOUT_S and the workspace was
  // left to process exit instead of freed.
  bool abandoned() const { return abandoned_; }
  bool is_local(int rank) const;
  uint64_t staging_bytes() const { return chunk_cap_; }

  // Collectives on CUDA memory. `members`: the group's ordered global ranks (all local), `me` this
  // rank's index; `slot` >= 0 issues the operation on a graph slot instead (members ignored, the
  // device table decides). All enqueued on `stream`; they return at once.
  void all_gather(const std::vector<int>& members, int me, const void* in, void* out, uint64_t bytes,
                  uintptr_t stream, int slot = -1);
  void all_to_all(const std::vector<int>& members, int me, const void* in, void* out,
                  const std::vector<uint64_t>& in_offsets, const std::vector<uint64_t>& in_sizes,
                  const std::vector<uint64_t>& out_offsets, const std::vector<uint64_t>& out_sizes,
                  uintptr_t stream, int slot = -1);
  void reduce_scatter(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                      DType dtype, RedOp op, uintptr_t stream, int slot = -1);
  void all_reduce(const std::vector<int>& members, int me, const void* in, void* out, uint64_t count,
                  DType dtype, RedOp op, uintptr_t stream, int slot = -1);
  void broadcast(const std::vector<int>& members, int me, int root_index, void* buf, uint64_t bytes,
                 uintptr_t stream, int slot = -1);
  // Enqueues a barrier: later work on the stream starts once every member reached it.
  void barrier(const std::vector<int>& members, int me, uintptr_t stream, int slot = -1);
  void batch_p2p(const std::vector<IpcP2P>& ops, uintptr_t stream);

  // Graph slots (group-agnostic graphs): a new slot of `size` members; every rank creates its
  // slots in the same order. bind() rewrites the slot's table on `stream`.
  int graph_slot(int size);
  void bind(int slot, const std::vector<int>& members, int me, int epoch, uintptr_t stream);

  // Raises the error the watchdog recorded, if any.
  void check() const;

 private:
  struct Group {
    int n = 0;
    int me = 0;
    int channel = 0;
    int slot = -1;
    int32_t members[8] = {};    // local indices
    std::vector<int> ranks;     // global ranks (for messages and liveness)
  };
  struct Record {
    uint64_t id;
    cudaEvent_t event;
    cudaStream_t stream;
    uint64_t begin, end;  // staging region [begin, end) (end == begin: none)
    std::chrono::steady_clock::time_point deadline;
    std::vector<int> peers;  // local indices of the peers it waits for
    const char* what;
    std::vector<int> ranks;
  };
  struct Issue {
    cudaStream_t stream;
    bool capturing;
    uint64_t staging;
    uint64_t bytes;
  };

  Group resolve(const std::vector<int>& members, int me, int slot, const char* what) const;
  Issue begin(const Group& g, uint64_t bytes, uintptr_t stream, const char* what);
  void end(const Group& g, const Issue& is, const char* what);
  void wait_counter(const Group& g, const Issue& is, int phase);
  void barrier_group(const Group& g, uintptr_t stream);
  void check_alive(const int32_t* locals, int n, const char* what, const std::vector<int>& ranks) const;
  void wait_word(cudaStream_t stream, uint64_t offset, uint32_t value);
  void fill_ctx(const Group& g, void* ctx) const;
  void check_usable() const;
  uint64_t channel_of(const int32_t* locals, int n) const;
  void prune_locked();
  bool record_done_locked(uint64_t id);
  void watchdog();
  void fail(ErrorCode code, const std::string& message);

  int rank_;
  int device_;
  IpcOptions options_;
  char* ws_ = nullptr;
  uint64_t ws_bytes_ = 0;
  int num_local_ = 0;
  int my_local_ = -1;
  std::vector<int> local_of_;          // global rank -> local index (-1: not local)
  std::vector<int> global_of_;         // local index -> global rank
  std::vector<char*> peer_bases_;      // local index -> mapped workspace (own included)
  std::vector<int64_t> pids_;
  std::vector<uint64_t> channel_base_;  // ordered subsets of size k start at channel_base_[k]
  uint64_t num_group_channels_ = 0;
  uint64_t num_channels_ = 0;
  uint64_t counters_ = 0, infos_ = 0, signal_begin_ = 0, signal_end_ = 0;
  uint64_t ring_begin_ = 0, ring_end_ = 0, ring_head_ = 0, chunk_cap_ = 0;
  bool abandoned_ = false;
  uint64_t arena_begin_ = 0, arena_end_ = 0;  // the graph arena (Note [ipc signalling])
  std::vector<int> slot_sizes_;
  std::vector<std::vector<int>> slot_ranks_;
  std::vector<uint32_t> send_seq_, recv_seq_;  // per local peer
  std::vector<std::pair<cudaStream_t, uint64_t>> channel_last_;  // last (stream, record id) per channel
  std::vector<std::pair<cudaStream_t, uint64_t>> pair_last_;

  mutable std::mutex mu_;  // everything below, and the members above on the issuing path
  std::deque<Record> pending_;
  std::vector<cudaEvent_t> event_pool_;
  uint64_t next_id_ = 1;
  bool attached_ = false;
  std::atomic<bool> closed_{false};
  std::atomic<bool> failed_{false};
  std::atomic<uint32_t> dead_mask_{0};  // local indices of peers the watchdog saw dead
  ErrorCode error_code_ = ErrorCode::kTimeout;
  std::string error_;

  std::thread watchdog_;
  std::condition_variable cv_;
  bool stop_ = false;
  cudaStream_t wd_stream_ = nullptr;
  cudaEvent_t release_event_ = nullptr;  // the watchdog's last release copy
  bool release_pending_ = false;
  void* abort_host_ = nullptr;  // pinned, kAbortByte over the signal area's size
};

}  // namespace gfcoll
