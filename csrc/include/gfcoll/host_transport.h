// Host transport: group-free collectives on CPU memory between processes of one node.
//
// Note [host protocol]
// Every rank owns one POSIX shared-memory segment, mapped by every local peer once at init and
// unlinked as soon as all peers have mapped it (so a killed process can never leave it behind).
// A segment holds `num_slots` slots; a slot carries one window (at most `chunk_bytes`) of one byte
// stream that its owner publishes. A stream is named by a StreamKey: (group hash, epoch, substream).
// The group hash names the ordered member list, the epoch counts that group's operations on each
// member (rule 1: every member issues a group's operations in the same order), the substream tells
// apart several streams of one operation (all_to_all sends one stream per destination).
//
// An operation is a set of streams this rank publishes and a set of byte ranges it pulls from its
// peers' streams. It runs in windows: in window w every rank publishes window w of each of its
// streams into a free slot of its own segment, then pulls window w of the ranges it needs, and
// acknowledges each slot it read. A slot is reused once all its readers acknowledged. Because
// readers find a window by its key (a scan of the peer's slot headers), operations on different or
// overlapping groups can be in flight at once, from several threads, in any order: nothing is
// matched by the order of messages between two ranks. Window w of any stream depends only on
// windows < w having been drained, so one operation cannot deadlock on itself.
//
// Slot headers are published with a seqlock (odd state while written, even once published); the
// payload is written before the release store that makes the state even. Waiting uses a per-segment
// futex doorbell that publishers and acknowledgers ring, with a short spin first. A waiter checks the
// liveness of the ranks it waits for (their pid, recorded in their segment) and the deadline.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gfcoll/types.h"

namespace gfcoll {

struct StreamKey {
  uint64_t group = 0;  // hash of the ordered member list (or of the ordered pair, for p2p)
  uint64_t epoch = 0;  // the group's operation counter on this rank
  uint32_t sub = 0;    // substream within one operation
};

struct HostOptions {
  int num_slots = 32;
  uint64_t chunk_bytes = 512 * 1024;
  double timeout_s = 300.0;
};

// One point-to-point transfer of a fused batch (world.batch_p2p).
struct HostP2P {
  bool is_send = false;
  int peer = -1;        // global rank
  void* ptr = nullptr;  // source (send) or destination (recv)
  uint64_t bytes = 0;
  StreamKey key;        // (pair hash, per-pair sequence number); both sides compute the same
};

struct SegmentHeader;
struct SlotHeader;

class HostTransport {
 public:
  HostTransport(int rank, int world_size, HostOptions options);
  ~HostTransport();
  HostTransport(const HostTransport&) = delete;
  HostTransport& operator=(const HostTransport&) = delete;

  // Bootstrap, driven by the Python layer through the key-value store:
  // create_segment() on every rank, attach() every local peer's name, then unlink_own() once all
  // peers have attached. Only the ranks attached (and this rank) can be group members.
  std::string create_segment(const std::string& name);
  void attach(int peer, const std::string& name);
  void unlink_own();
  void close();  // unmaps everything; later operations throw kClosed
  bool is_attached(int peer) const;

  // Collectives. `members` are the ordered global ranks of the group, `me` this rank's index in it.
  // All sizes are in bytes except `count` (elements). Each call blocks until this rank's part is
  // done: its output is complete and no peer still needs its input.
  void all_gather(StreamKey key, const std::vector<int>& members, int me, const void* in, void* out,
                  uint64_t bytes, DType dtype);
  void all_to_all(StreamKey key, const std::vector<int>& members, int me, const void* in, void* out,
                  const std::vector<uint64_t>& in_offsets, const std::vector<uint64_t>& in_sizes,
                  const std::vector<uint64_t>& out_offsets, const std::vector<uint64_t>& out_sizes, DType dtype);
  void reduce_scatter(StreamKey key, const std::vector<int>& members, int me, const void* in, void* out,
                      uint64_t count, DType dtype, RedOp op);
  // `in` may equal `out` (in place).
  void all_reduce(StreamKey key, const std::vector<int>& members, int me, const void* in, void* out,
                  uint64_t count, DType dtype, RedOp op);
  void broadcast(StreamKey key, const std::vector<int>& members, int me, int root_index, void* buf,
                 uint64_t bytes, DType dtype);
  void barrier(StreamKey key, const std::vector<int>& members, int me);
  void batch_p2p(const std::vector<HostP2P>& ops);

  int rank() const { return rank_; }
  const HostOptions& options() const { return options_; }
  // Slots never drained after a failed operation (kept out of use; see Note [host protocol]).
  int num_leaked_slots() const;

 private:
  struct Publish;
  struct Read;
  struct Reduce;
  struct Op;
  struct Mapping {
    void* base = nullptr;
    uint64_t size = 0;
  };

  void run(Op& op);
  void check_open() const;
  void check_members(const std::vector<int>& members, int me, const char* what) const;
  SegmentHeader* seg(int r) const;
  SlotHeader* slot(int r, int index) const;
  char* slot_data(int r, int index) const;
  int acquire_slot(const Op& op);
  void release_slot(int index);
  int find_slot(int peer, const StreamKey& key, uint32_t window) const;
  template <typename Ready>
  void wait_until(int seg_rank, Ready&& ready, const Op& op, const std::vector<int>& watch, const char* what);
  void ring(int r) const;
  bool peer_alive(int r) const;

  int rank_;
  int world_size_;
  HostOptions options_;
  uint64_t segment_bytes_ = 0;
  std::string own_name_;
  bool own_linked_ = false;
  std::atomic<bool> closed_{false};
  std::vector<Mapping> maps_;  // indexed by global rank; base == nullptr when not attached
  mutable std::mutex slot_mu_;
  std::vector<char> slot_in_use_;
  int leaked_slots_ = 0;
};

}  // namespace gfcoll
