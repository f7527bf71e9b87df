// Implementation of the host transport; the protocol is described in Note [host protocol] in
// host_transport.h.
#include "gfcoll/host_transport.h"
#include "gfcoll/proc.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>

#include "../kernels/host_reduce.h"

namespace gfcoll {

namespace {
constexpr uint64_t kMagic = 0x6766636f6c6c3031ull;  // "gfcoll01"
constexpr uint64_t kHeaderBytes = 4096;
constexpr int kSpinIterations = 2000;
constexpr auto kFutexSlice = std::chrono::milliseconds(5);
constexpr auto kLivenessPeriod = std::chrono::milliseconds(50);

uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

std::string errno_text() { return std::strerror(errno); }

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, std::chrono::nanoseconds timeout) {
  struct timespec ts;
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000000);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1000000000);
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}
}  // namespace

struct alignas(64) SegmentHeader {
  uint64_t magic;
  int64_t pid;
  int32_t rank;
  int32_t num_slots;
  uint64_t chunk_bytes;
  uint64_t slots_offset;
  uint64_t data_offset;
  alignas(64) std::atomic<uint32_t> doorbell;
  std::atomic<uint32_t> waiters;
};

struct alignas(64) SlotHeader {
  std::atomic<uint64_t> state;  // seqlock: 0 never used, odd being written, even published
  std::atomic<uint64_t> group;
  std::atomic<uint64_t> epoch;
  std::atomic<uint64_t> stream_bytes;
  std::atomic<uint64_t> window_bytes;
  std::atomic<uint32_t> sub;
  std::atomic<uint32_t> window;
  std::atomic<uint32_t> dtype;
  std::atomic<uint32_t> num_readers;
  std::atomic<uint32_t> acks;
};

struct HostTransport::Publish {
  StreamKey key;
  const char* src;
  uint64_t bytes;
  int dtype;
  std::vector<int> readers;                               // global ranks
  std::vector<std::pair<uint64_t, uint64_t>> ranges;      // what each reader takes, [a, b)
  std::vector<int> slots;                                 // slot used for each window, -1 once drained
};

struct HostTransport::Read {
  int peer;
  StreamKey key;
  uint64_t stream_bytes;  // what this rank expects the whole stream to be: checked against the header
  int dtype;
  uint64_t offset, bytes;  // range of the peer's stream
  char* dst;               // where byte `offset` lands
};

struct HostTransport::Reduce {
  std::vector<int> members;  // group order: the order of accumulation
  int me;
  StreamKey key;
  uint64_t stream_bytes;
  const char* self_src;      // this rank's whole stream
  uint64_t begin, end;       // the range of every stream that is reduced
  char* dst;                 // where byte `begin` of the result lands
  DType dtype;
  RedOp op;
};

struct HostTransport::Op {
  const char* name;
  std::vector<int> members;  // for messages and liveness checks
  std::vector<Publish> publishes;
  std::vector<Read> reads;
  std::vector<Reduce> reduces;
  std::chrono::steady_clock::time_point deadline;
};

HostTransport::HostTransport(int rank, int world_size, HostOptions options)
    : rank_(rank), world_size_(world_size), options_(options) {
  GF_ASSERT(world_size > 0 && rank >= 0 && rank < world_size, kInvalidArgument, "rank ", rank,
            " out of range for world size ", world_size);
  GF_ASSERT(options.num_slots >= 4, kInvalidArgument, "host transport needs at least 4 slots, got ",
            options.num_slots);
  GF_ASSERT(options.chunk_bytes >= 4096 && options.chunk_bytes % 64 == 0, kInvalidArgument,
            "host chunk size must be a multiple of 64 bytes and at least 4096, got ", options.chunk_bytes);
  GF_ASSERT(options.timeout_s > 0, kInvalidArgument, "timeout must be positive, got ", options.timeout_s);
  maps_.resize(world_size);
  slot_in_use_.assign(options.num_slots, 0);
  uint64_t slots_bytes = round_up(sizeof(SlotHeader) * options.num_slots, 4096);
  segment_bytes_ = kHeaderBytes + slots_bytes + options.chunk_bytes * options.num_slots;
}

HostTransport::~HostTransport() {
  // Only local resources: mappings and, if init never finished, our own name.
  try {
    close();
  } catch (...) {
  }
}

std::string HostTransport::create_segment(const std::string& name) {
  check_open();
  GF_ASSERT(maps_[rank_].base == nullptr, kInvalidArgument, "segment already created");
  GF_ASSERT(!name.empty() && name[0] == '/' && name.size() < 250, kInvalidArgument, "bad shm name ", name);
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  GF_ASSERT(fd >= 0, kSystem, "shm_open(", name, ") failed: ", errno_text());
  own_name_ = name;
  own_linked_ = true;
  // Reserve the pages now so that a full /dev/shm is an error here, not a SIGBUS later.
  int err = posix_fallocate(fd, 0, static_cast<off_t>(segment_bytes_));
  if (err != 0) {
    ::close(fd);
    unlink_own();
    GF_THROW(kSystem, "cannot reserve ", segment_bytes_, " bytes of shared memory for ", name, ": ",
             std::strerror(err), " (is /dev/shm large enough? GFCOLL_HOST_SLOTS and GFCOLL_HOST_CHUNK_BYTES set the size)");
  }
  void* base = mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) {
    unlink_own();
    GF_THROW(kSystem, "mmap of ", name, " failed: ", errno_text());
  }
  maps_[rank_] = {base, segment_bytes_};
  auto* h = new (base) SegmentHeader();
  h->pid = getpid();
  h->rank = rank_;
  h->num_slots = options_.num_slots;
  h->chunk_bytes = options_.chunk_bytes;
  h->slots_offset = kHeaderBytes;
  h->data_offset = kHeaderBytes + round_up(sizeof(SlotHeader) * options_.num_slots, 4096);
  h->doorbell.store(0);
  h->waiters.store(0);
  for (int i = 0; i < options_.num_slots; ++i) new (slot(rank_, i)) SlotHeader();
  std::atomic_thread_fence(std::memory_order_release);
  h->magic = kMagic;
  return own_name_;
}

void HostTransport::attach(int peer, const std::string& name) {
  check_open();
  GF_ASSERT(peer >= 0 && peer < world_size_ && peer != rank_, kInvalidArgument, "bad peer rank ", peer);
  GF_ASSERT(maps_[peer].base == nullptr, kInvalidArgument, "peer ", peer, " already attached");
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  GF_ASSERT(fd >= 0, kSystem, "shm_open(", name, ") of rank ", peer, " failed: ", errno_text());
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != segment_bytes_) {
    ::close(fd);
    GF_THROW(kMismatch, "segment of rank ", peer, " has ", static_cast<long long>(st.st_size),
             " bytes, expected ", segment_bytes_, ": every rank must use the same GFCOLL_HOST_* settings");
  }
  void* base = mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  GF_ASSERT(base != MAP_FAILED, kSystem, "mmap of rank ", peer, "'s segment failed: ", errno_text());
  auto* h = static_cast<SegmentHeader*>(base);
  if (h->magic != kMagic || h->rank != peer) {
    munmap(base, segment_bytes_);
    GF_THROW(kMismatch, "segment ", name, " is not rank ", peer, "'s gfcoll segment");
  }
  maps_[peer] = {base, segment_bytes_};
}

void HostTransport::unlink_own() {
  if (own_linked_) {
    shm_unlink(own_name_.c_str());
    own_linked_ = false;
  }
}

void HostTransport::close() {
  if (closed_.exchange(true)) return;
  unlink_own();
  for (auto& m : maps_) {
    if (m.base != nullptr) munmap(m.base, m.size);
    m = {};
  }
}

bool HostTransport::is_attached(int peer) const {
  return peer >= 0 && peer < world_size_ && maps_[peer].base != nullptr;
}

int HostTransport::num_leaked_slots() const {
  std::lock_guard<std::mutex> lock(slot_mu_);
  return leaked_slots_;
}

void HostTransport::check_open() const {
  GF_ASSERT(!closed_.load(), kClosed, "the gfcoll world was closed");
}

void HostTransport::check_members(const std::vector<int>& members, int me, const char* what) const {
  check_open();
  GF_ASSERT(me >= 0 && me < static_cast<int>(members.size()) && members[me] == rank_, kInvalidArgument,
            what, ": rank ", rank_, " is not member ", me, " of the group");
  for (int r : members) {
    GF_ASSERT(r >= 0 && r < world_size_ && maps_[r].base != nullptr, kUnsupported, what, ": rank ", r,
              " is not reachable through the host transport (not on this node)");
  }
}

SegmentHeader* HostTransport::seg(int r) const { return static_cast<SegmentHeader*>(maps_[r].base); }

SlotHeader* HostTransport::slot(int r, int index) const {
  return reinterpret_cast<SlotHeader*>(static_cast<char*>(maps_[r].base) + kHeaderBytes) + index;
}

char* HostTransport::slot_data(int r, int index) const {
  return static_cast<char*>(maps_[r].base) + seg(r)->data_offset + options_.chunk_bytes * index;
}

void HostTransport::ring(int r) const {
  SegmentHeader* h = seg(r);
  h->doorbell.fetch_add(1, std::memory_order_seq_cst);
  if (h->waiters.load(std::memory_order_seq_cst) > 0) futex_wake_all(&h->doorbell);
}

bool HostTransport::peer_alive(int r) const { return process_alive(seg(r)->pid); }

template <typename Ready>
void HostTransport::wait_until(int seg_rank, Ready&& ready, const Op& op, const std::vector<int>& watch,
                               const char* what) {
  for (int i = 0; i < kSpinIterations; ++i) {
    if (ready()) return;
    cpu_relax();
  }
  SegmentHeader* h = seg(seg_rank);
  auto next_check = std::chrono::steady_clock::now() + kLivenessPeriod;
  while (true) {
    h->waiters.fetch_add(1, std::memory_order_seq_cst);
    uint32_t v = h->doorbell.load(std::memory_order_seq_cst);
    if (ready()) {
      h->waiters.fetch_sub(1, std::memory_order_seq_cst);
      return;
    }
    futex_wait(&h->doorbell, v, kFutexSlice);
    h->waiters.fetch_sub(1, std::memory_order_seq_cst);
    if (ready()) return;
    check_open();
    auto now = std::chrono::steady_clock::now();
    if (now >= next_check) {
      next_check = now + kLivenessPeriod;
      for (int r : watch) {
        GF_ASSERT(peer_alive(r), kPeerDied, op.name, ": rank ", r, " (pid ", seg(r)->pid,
                  ") died while rank ", rank_, " was waiting for ", what);
      }
    }
    GF_ASSERT(now < op.deadline, kTimeout, op.name, ": rank ", rank_, " timed out after ", options_.timeout_s,
              " s waiting for ", what, " (GFCOLL_TIMEOUT_S sets the limit)");
  }
}

int HostTransport::acquire_slot(const Op& op) {
  auto try_take = [&]() -> int {
    std::lock_guard<std::mutex> lock(slot_mu_);
    for (int i = 0; i < options_.num_slots; ++i) {
      if (!slot_in_use_[i]) {
        slot_in_use_[i] = 1;
        return i;
      }
    }
    return -1;
  };
  int index = try_take();
  if (index >= 0) return index;
  // Every slot is held by operations in flight on this rank: wait until one is released.
  std::vector<int> none;
  wait_until(rank_, [&] { return (index = try_take()) >= 0; }, op, none,
             "a free host slot (raise GFCOLL_HOST_SLOTS for more operations in flight)");
  return index;
}

void HostTransport::release_slot(int index) {
  {
    std::lock_guard<std::mutex> lock(slot_mu_);
    slot_in_use_[index] = 0;
  }
  ring(rank_);  // an acquire_slot() of another thread may be waiting
}

int HostTransport::find_slot(int peer, const StreamKey& key, uint32_t window) const {
  for (int i = 0; i < options_.num_slots; ++i) {
    SlotHeader* s = slot(peer, i);
    uint64_t s1 = s->state.load(std::memory_order_acquire);
    if (s1 == 0 || (s1 & 1)) continue;
    bool match = s->group.load(std::memory_order_relaxed) == key.group &&
                 s->epoch.load(std::memory_order_relaxed) == key.epoch &&
                 s->sub.load(std::memory_order_relaxed) == key.sub &&
                 s->window.load(std::memory_order_relaxed) == window;
    std::atomic_thread_fence(std::memory_order_acquire);
    if (match && s->state.load(std::memory_order_relaxed) == s1) return i;
  }
  return -1;
}

void HostTransport::run(Op& op) {
  const uint64_t chunk = options_.chunk_bytes;
  auto num_windows = [&](uint64_t bytes) { return (bytes + chunk - 1) / chunk; };
  auto overlaps = [&](uint64_t a, uint64_t b, uint64_t w) {
    return a < b && a < (w + 1) * chunk && b > w * chunk;
  };
  op.deadline = std::chrono::steady_clock::now() +
                std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                    std::chrono::duration<double>(options_.timeout_s));

  uint64_t total_windows = 0;
  for (auto& p : op.publishes) {
    p.slots.assign(num_windows(p.bytes), -1);
    total_windows = std::max(total_windows, p.slots.size());
  }
  for (auto& r : op.reads) {
    if (r.bytes > 0) total_windows = std::max(total_windows, (r.offset + r.bytes - 1) / chunk + 1);
  }
  for (auto& d : op.reduces) {
    if (d.end > d.begin) total_windows = std::max(total_windows, (d.end - 1) / chunk + 1);
  }

  thread_local std::vector<char> acc;
  auto drain = [&](Publish& p, uint64_t w) {
    int index = p.slots[w];
    if (index < 0) return;
    SlotHeader* s = slot(rank_, index);
    uint32_t expected = s->num_readers.load(std::memory_order_relaxed);
    wait_until(rank_, [&] { return s->acks.load(std::memory_order_acquire) >= expected; }, op, p.readers,
               "its readers to take a window it published");
    p.slots[w] = -1;
    release_slot(index);
  };
  auto await_window = [&](int peer, const StreamKey& key, uint64_t w, uint64_t stream_bytes, int dtype) {
    int index = -1;
    std::vector<int> watch{peer};
    char what[160];
    std::snprintf(what, sizeof(what), "rank %d to publish window %llu of epoch %llu", peer,
                  static_cast<unsigned long long>(w), static_cast<unsigned long long>(key.epoch));
    wait_until(peer, [&] { return (index = find_slot(peer, key, static_cast<uint32_t>(w))) >= 0; }, op,
               watch, what);
    SlotHeader* s = slot(peer, index);
    uint64_t theirs = s->stream_bytes.load(std::memory_order_relaxed);
    int their_dtype = static_cast<int>(s->dtype.load(std::memory_order_relaxed));
    GF_ASSERT(theirs == stream_bytes, kMismatch, op.name, ": rank ", peer, " sends ", theirs,
              " bytes where rank ", rank_, " expects ", stream_bytes, " (mismatched sizes or splits)");
    GF_ASSERT(their_dtype == dtype, kMismatch, op.name, ": rank ", peer, " uses dtype ",
              dtype_name(static_cast<DType>(their_dtype)), " where rank ", rank_, " uses ",
              dtype_name(static_cast<DType>(dtype)));
    return index;
  };
  auto ack = [&](int peer, int index) {
    slot(peer, index)->acks.fetch_add(1, std::memory_order_acq_rel);
    ring(peer);
  };

  try {
    for (uint64_t w = 0; w < total_windows; ++w) {
      const uint64_t ws = w * chunk;
      for (auto& p : op.publishes) {
        if (w >= p.slots.size()) continue;
        uint32_t readers = 0;
        for (auto& rg : p.ranges) readers += overlaps(rg.first, rg.second, w) ? 1 : 0;
        if (readers == 0) continue;
        if (w >= 2) drain(p, w - 2);
        int index = acquire_slot(op);
        p.slots[w] = index;
        SlotHeader* s = slot(rank_, index);
        uint64_t len = std::min(chunk, p.bytes - ws);
        uint64_t st = s->state.load(std::memory_order_relaxed);
        s->state.store(st + 1, std::memory_order_relaxed);  // odd: being written
        std::atomic_thread_fence(std::memory_order_release);
        std::memcpy(slot_data(rank_, index), p.src + ws, len);
        s->group.store(p.key.group, std::memory_order_relaxed);
        s->epoch.store(p.key.epoch, std::memory_order_relaxed);
        s->sub.store(p.key.sub, std::memory_order_relaxed);
        s->window.store(static_cast<uint32_t>(w), std::memory_order_relaxed);
        s->stream_bytes.store(p.bytes, std::memory_order_relaxed);
        s->window_bytes.store(len, std::memory_order_relaxed);
        s->dtype.store(static_cast<uint32_t>(p.dtype), std::memory_order_relaxed);
        s->num_readers.store(readers, std::memory_order_relaxed);
        s->acks.store(0, std::memory_order_relaxed);
        s->state.store(st + 2, std::memory_order_release);  // even: published
        ring(rank_);
      }
      for (auto& r : op.reads) {
        if (!overlaps(r.offset, r.offset + r.bytes, w)) continue;
        int index = await_window(r.peer, r.key, w, r.stream_bytes, r.dtype);
        uint64_t a = std::max(r.offset, ws), b = std::min(r.offset + r.bytes, ws + chunk);
        std::memcpy(r.dst + (a - r.offset), slot_data(r.peer, index) + (a - ws), b - a);
        ack(r.peer, index);
      }
      for (auto& d : op.reduces) {
        if (!overlaps(d.begin, d.end, w)) continue;
        uint64_t a = std::max(d.begin, ws), b = std::min(d.end, ws + chunk);
        size_t es = dtype_size(d.dtype);
        size_t count = (b - a) / es;
        acc.resize(std::max<size_t>(acc.size(), count * host_acc_elem_size(d.dtype)));
        for (size_t k = 0; k < d.members.size(); ++k) {
          const char* src;
          int index = -1;
          if (static_cast<int>(k) == d.me) {
            src = d.self_src + a;
          } else {
            index = await_window(d.members[k], d.key, w, d.stream_bytes, static_cast<int>(d.dtype));
            src = slot_data(d.members[k], index) + (a - ws);
          }
          if (k == 0) {
            host_reduce_init(d.dtype, acc.data(), src, count);
          } else {
            host_reduce_accumulate(d.dtype, d.op, acc.data(), src, count);
          }
          if (index >= 0) ack(d.members[k], index);
        }
        host_reduce_finish(d.dtype, d.op, d.dst + (a - d.begin), acc.data(), count,
                           static_cast<int>(d.members.size()));
      }
    }
    for (auto& p : op.publishes) {
      for (uint64_t w = 0; w < p.slots.size(); ++w) drain(p, w);
    }
  } catch (...) {
    // Slots still published may be read by a peer that is alive: keep them out of use.
    std::lock_guard<std::mutex> lock(slot_mu_);
    for (auto& p : op.publishes) {
      for (int index : p.slots) leaked_slots_ += index >= 0 ? 1 : 0;
    }
    throw;
  }
}

void HostTransport::all_gather(StreamKey key, const std::vector<int>& members, int me, const void* in,
                               void* out, uint64_t bytes, DType dtype) {
  check_members(members, me, "all_gather");
  const int dt = static_cast<int>(dtype);
  const int n = static_cast<int>(members.size());
  Op op{"all_gather", members, {}, {}, {}, {}};
  Publish p{key, static_cast<const char*>(in), bytes, dt, {}, {}, {}};
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    p.readers.push_back(members[j]);
    p.ranges.push_back({0, bytes});
    op.reads.push_back({members[j], key, bytes, dt, 0, bytes, static_cast<char*>(out) + j * bytes});
  }
  op.publishes.push_back(std::move(p));
  char* mine = static_cast<char*>(out) + me * bytes;
  if (mine != in && bytes > 0) std::memmove(mine, in, bytes);
  // The local copy happens first, so `in` may alias this rank's block of `out` (in place).
  op.publishes[0].src = mine;
  run(op);
}

void HostTransport::all_to_all(StreamKey key, const std::vector<int>& members, int me, const void* in,
                               void* out, const std::vector<uint64_t>& in_offsets,
                               const std::vector<uint64_t>& in_sizes, const std::vector<uint64_t>& out_offsets,
                               const std::vector<uint64_t>& out_sizes, DType dtype) {
  check_members(members, me, "all_to_all");
  const int dt = static_cast<int>(dtype);
  const int n = static_cast<int>(members.size());
  GF_ASSERT(static_cast<int>(in_offsets.size()) == n && static_cast<int>(in_sizes.size()) == n &&
                static_cast<int>(out_offsets.size()) == n && static_cast<int>(out_sizes.size()) == n,
            kInvalidArgument, "all_to_all: split lists must have one entry per member");
  GF_ASSERT(in_sizes[me] == out_sizes[me], kMismatch, "all_to_all: rank ", rank_, " sends itself ",
            in_sizes[me], " bytes but expects ", out_sizes[me]);
  Op op{"all_to_all", members, {}, {}, {}, {}};
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    StreamKey to_j = key;
    to_j.sub = static_cast<uint32_t>(j);
    op.publishes.push_back({to_j, src + in_offsets[j], in_sizes[j], dt, {members[j]}, {{0, in_sizes[j]}}, {}});
    StreamKey to_me = key;
    to_me.sub = static_cast<uint32_t>(me);
    op.reads.push_back({members[j], to_me, out_sizes[j], dt, 0, out_sizes[j], dst + out_offsets[j]});
  }
  if (in_sizes[me] > 0) std::memmove(dst + out_offsets[me], src + in_offsets[me], in_sizes[me]);
  run(op);
}

void HostTransport::reduce_scatter(StreamKey key, const std::vector<int>& members, int me, const void* in,
                                   void* out, uint64_t count, DType dtype, RedOp op_kind) {
  check_members(members, me, "reduce_scatter");
  check_reduction(dtype, op_kind);
  const int n = static_cast<int>(members.size());
  const uint64_t block = count * dtype_size(dtype);
  Op op{"reduce_scatter", members, {}, {}, {}, {}};
  Publish p{key, static_cast<const char*>(in), block * n, static_cast<int>(dtype), {}, {}, {}};
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    p.readers.push_back(members[j]);
    p.ranges.push_back({block * j, block * (j + 1)});
  }
  op.publishes.push_back(std::move(p));
  op.reduces.push_back({members, me, key, block * n, static_cast<const char*>(in), block * me,
                        block * (me + 1), static_cast<char*>(out), dtype, op_kind});
  run(op);
}

void HostTransport::all_reduce(StreamKey key, const std::vector<int>& members, int me, const void* in,
                               void* out, uint64_t count, DType dtype, RedOp op_kind) {
  check_members(members, me, "all_reduce");
  check_reduction(dtype, op_kind);
  const int n = static_cast<int>(members.size());
  const uint64_t bytes = count * dtype_size(dtype);
  Op op{"all_reduce", members, {}, {}, {}, {}};
  Publish p{key, static_cast<const char*>(in), bytes, static_cast<int>(dtype), {}, {}, {}};
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    p.readers.push_back(members[j]);
    p.ranges.push_back({0, bytes});
  }
  op.publishes.push_back(std::move(p));
  // In place is safe: window w of `in` is published before window w of `out` is written.
  op.reduces.push_back({members, me, key, bytes, static_cast<const char*>(in), 0, bytes,
                        static_cast<char*>(out), dtype, op_kind});
  run(op);
}

void HostTransport::broadcast(StreamKey key, const std::vector<int>& members, int me, int root_index,
                              void* buf, uint64_t bytes, DType dtype) {
  check_members(members, me, "broadcast");
  const int dt = static_cast<int>(dtype);
  const int n = static_cast<int>(members.size());
  GF_ASSERT(root_index >= 0 && root_index < n, kInvalidArgument, "broadcast: bad root index ", root_index);
  Op op{"broadcast", members, {}, {}, {}, {}};
  if (me == root_index) {
    Publish p{key, static_cast<const char*>(buf), bytes, dt, {}, {}, {}};
    for (int j = 0; j < n; ++j) {
      if (j == me) continue;
      p.readers.push_back(members[j]);
      p.ranges.push_back({0, bytes});
    }
    op.publishes.push_back(std::move(p));
  } else {
    op.reads.push_back({members[root_index], key, bytes, dt, 0, bytes, static_cast<char*>(buf)});
  }
  run(op);
}

void HostTransport::barrier(StreamKey key, const std::vector<int>& members, int me) {
  check_members(members, me, "barrier");
  static const char token = 1;
  const int n = static_cast<int>(members.size());
  std::vector<char> sink(n);
  Op op{"barrier", members, {}, {}, {}, {}};
  Publish p{key, &token, 1, 0, {}, {}, {}};
  for (int j = 0; j < n; ++j) {
    if (j == me) continue;
    p.readers.push_back(members[j]);
    p.ranges.push_back({0, 1});
    op.reads.push_back({members[j], key, 1, 0, 0, 1, &sink[j]});
  }
  op.publishes.push_back(std::move(p));
  run(op);
}

void HostTransport::batch_p2p(const std::vector<HostP2P>& ops) {
  check_open();
  Op op{"batch_p2p", {}, {}, {}, {}, {}};
  for (const auto& x : ops) {
    GF_ASSERT(x.peer >= 0 && x.peer < world_size_ && x.peer != rank_, kInvalidArgument,
              "p2p: bad peer rank ", x.peer, " for rank ", rank_);
    GF_ASSERT(maps_[x.peer].base != nullptr, kUnsupported, "p2p: rank ", x.peer,
              " is not reachable through the host transport (not on this node)");
    op.members.push_back(x.peer);
    if (x.is_send) {
      op.publishes.push_back({x.key, static_cast<const char*>(x.ptr), x.bytes, 0, {x.peer}, {{0, x.bytes}}, {}});
    } else {
      op.reads.push_back({x.peer, x.key, x.bytes, 0, 0, x.bytes, static_cast<char*>(x.ptr)});
    }
  }
  run(op);
}

}  // namespace gfcoll
