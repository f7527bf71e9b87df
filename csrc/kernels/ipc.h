// Kernels of the ipc transport and the workspace layout they share with csrc/core/ipc_transport.cc.
// Torch-free: raw device pointers, byte counts, a dtype enum and a stream. The protocol they
// implement is Note [ipc signalling] in csrc/include/gfcoll/ipc_transport.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gfcoll/types.h"

namespace gfcoll {
namespace ipc {

constexpr int kMaxLocal = 8;    // ranks of one node that can share an ipc workspace
constexpr int kMaxSlots = 64;   // graph slots per world
constexpr int kP2PDepth = 16;   // point-to-point messages in flight per ordered pair
constexpr int kPhases = 3;      // collective phases: 0 staged ("ready"), 1 reduced ("mid"), 2 done
constexpr uint32_t kAbortByte = 0x40;  // the watchdog fills the signal area with this byte

// Device-side member table of a graph slot (Note [ipc signalling], group-agnostic graphs).
struct Table {
  int32_t n;
  int32_t me;
  int32_t epoch;  // the bound group's operation counter at bind time (diagnostics)
  int32_t pad;
  int32_t members[kMaxLocal];  // local indices of the bound group's members, in group order
};

// Per channel (one per ordered group of local ranks, plus one per graph slot), not signal words.
struct ChannelInfo {
  uint32_t blocks[4];          // [phase]: finished blocks of this rank's kernel that signals phase
  uint64_t staging;            // offset in this rank's workspace of its staging for the current op
  uint64_t aux[kMaxLocal];     // all_to_all: offset within staging of the block for member j
  uint64_t pad[3];
};

// The head of every rank's workspace. Same layout in every rank, so that an offset names the same
// word in each. Everything the watchdog may overwrite lives in [signal_begin, signal_end).
struct Control {
  uint64_t peer_bases[kMaxLocal];  // this process's addresses of every local rank's workspace
  Table tables[kMaxSlots];
  uint64_t p2p_mbox[kMaxLocal][kP2PDepth];  // at the sender: staging offset of message seq to dst
  uint32_t p2p_send_blocks[kMaxLocal][kP2PDepth];
  uint32_t p2p_recv_blocks[kMaxLocal][kP2PDepth];
  // ---- signal area (filled with kAbortByte on abort) ----
  alignas(256) uint32_t abort;  // nonzero: kernels return at once, touching nothing
  uint32_t pad0[63];
  uint32_t p2p_ready[kMaxLocal][kP2PDepth];  // at the receiver, from src: seq + 1 of message seq
  uint32_t p2p_done[kMaxLocal][kP2PDepth];   // at the sender, from dst: seq + 1 once dst read it
  // followed by uint32_t counter[num_channels][4] (arrivals per phase), then ChannelInfo[num_channels]
};

// Offsets of the parts of a workspace for `num_channels` channels.
struct Layout {
  uint64_t signal_begin;
  uint64_t counters;  // uint32_t[num_channels][4]
  uint64_t signal_end;
  uint64_t infos;     // ChannelInfo[num_channels]
  uint64_t staging;   // first byte of the staging area (256-aligned)
};
Layout layout(uint64_t num_channels);

// What a kernel needs to find the group and its peers. With `table` set (graph slots) the group is
// read from the device at run time; otherwise from n/me/members.
struct Ctx {
  char* ws;              // this rank's workspace
  const Table* table;    // nullptr for eager groups
  int32_t n;
  int32_t me;
  int32_t members[kMaxLocal];
  uint64_t counters;     // offset of this channel's uint32_t[4] arrival counters (same in all workspaces)
  uint64_t info;         // offset of this channel's ChannelInfo
};

// What a kernel does when its last block finishes: reset one of this rank's arrival counters
// (the phase it waited for) and add one to `signal_phase` in every peer's counters.
struct Finish {
  int reset_phase = -1;   // -1: none
  int signal_phase = -1;  // -1: none
  int reset_done = 0;     // also reset the "done" counter (phase 2) of the previous operation
};

// One copy of a multi-segment copy kernel. Source: a raw pointer (src_member < 0) or the staging of
// group member src_member (+ src_add, + that member's aux[me] when src_aux). Destination: a raw
// pointer, or (dst_staging) this rank's staging + dst_add.
struct Seg {
  const char* src;
  char* dst;
  uint64_t src_add;
  uint64_t dst_add;
  uint64_t bytes;
  int32_t src_member;
  int32_t src_aux;
  int32_t dst_staging;
  int32_t pad;
};
constexpr int kMaxSegs = kMaxLocal + 1;
struct Segs {
  Seg s[kMaxSegs];
  int32_t num;
  // Stage kernels also publish: the staging offset, and per-member aux offsets (all_to_all).
  int32_t publish;
  uint64_t staging;
  uint64_t aux[kMaxLocal];
};

void launch_copy(const Ctx& ctx, const Segs& segs, const Finish& fin, cudaStream_t stream);

// Reduction over the group's staged inputs, in group order, float32 accumulation (kernels/reduce.h
// arithmetic). Modes: kAll (out[i] = op_j staging_j[i], i < count), kBlock (reduce_scatter: block
// `me` of every member's staging, count elements), kPart (two-shot all_reduce, phase 1: the part
// of member me, written to out and back into this rank's staging).
enum class ReduceMode : int { kAll = 0, kBlock = 1, kPart = 2 };
void launch_reduce(const Ctx& ctx, DType dtype, RedOp op, ReduceMode mode, void* out, uint64_t count,
                   const Finish& fin, cudaStream_t stream);

// Point to point. Send: stage `bytes` of src into this rank's staging at `staging`, publish it as
// message `seq` to local rank dst and signal dst. Recv: copy message `seq` of local rank src into
// dst and tell src it was read.
void launch_p2p_send(char* ws, int my_local, int dst_local, uint32_t seq, const void* src, uint64_t staging,
                     uint64_t bytes, cudaStream_t stream);
void launch_p2p_recv(char* ws, int my_local, int src_local, uint32_t seq, void* dst, uint64_t bytes,
                     cudaStream_t stream);

// Loads every kernel of this file on the current device now (Note [ipc signalling], "Loading"):
// under CUDA's lazy module loading a kernel's first launch may wait for the whole context, which
// never drains while one of this rank's streams waits for a peer.
void preload_kernels();

// Writes a graph slot's table (group order local indices) on the stream.
void launch_bind(char* ws, int slot, const Table& table, cudaStream_t stream);

}  // namespace ipc
}  // namespace gfcoll
