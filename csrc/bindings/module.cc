// The one binding file: exposes the torch-free core to Python. Pointers cross as integers, streams
// as integers (cudaStream_t), dtypes and reductions as the integer codes of types.h. Blocking calls
// release the GIL. gfcoll::Error is re-raised as the gfcoll.errors class chosen by its code.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "gfcoll/error.h"
#include "gfcoll/host_transport.h"
#include "gfcoll/types.h"

#ifdef GFCOLL_WITH_CUDA
#include <cuda_runtime.h>
#endif
#ifdef GFCOLL_WITH_IPC
#include "gfcoll/ipc_transport.h"
#endif
#ifdef GFCOLL_WITH_NCCL
#include <nccl.h>

#include "gfcoll/nccl_transport.h"
#endif

namespace py = pybind11;
using gfcoll::DType;
using gfcoll::RedOp;
using gfcoll::StreamKey;

namespace {

const char* exception_name(gfcoll::ErrorCode code) {
  switch (code) {
    case gfcoll::ErrorCode::kInvalidArgument: return "GfcollValueError";
    case gfcoll::ErrorCode::kUnsupported: return "GfcollUnsupportedError";
    case gfcoll::ErrorCode::kTimeout: return "GfcollTimeoutError";
    case gfcoll::ErrorCode::kPeerDied: return "GfcollPeerDiedError";
    case gfcoll::ErrorCode::kClosed: return "GfcollClosedError";
    case gfcoll::ErrorCode::kSystem: return "GfcollSystemError";
    case gfcoll::ErrorCode::kCuda: return "GfcollCudaError";
    case gfcoll::ErrorCode::kNccl: return "GfcollNcclError";
    case gfcoll::ErrorCode::kMismatch: return "GfcollMismatchError";
  }
  return "GfcollError";
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

StreamKey key(uint64_t group, uint64_t epoch) { return StreamKey{group, epoch, 0}; }

#ifdef GFCOLL_WITH_CUDA
// A CUDA event for async handles, independent of any framework.
class CudaEvent {
 public:
  CudaEvent() { GF_CHECK_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaEvent() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  void record(uintptr_t stream) { GF_CHECK_CUDA(cudaEventRecord(event_, reinterpret_cast<cudaStream_t>(stream))); }
  bool query() {
    cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) return false;
    GF_CHECK_CUDA(e);
    return true;
  }
  void wait(uintptr_t stream) {
    GF_CHECK_CUDA(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), event_, 0));
  }
  void synchronize() { GF_CHECK_CUDA(cudaEventSynchronize(event_)); }

 private:
  cudaEvent_t event_ = nullptr;
};
#endif

}  // namespace

PYBIND11_MODULE(_gfcoll, m) {
  m.doc() = "gfcoll native core (host, ipc and nccl transports)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gfcoll::Error& e) {
      py::object cls = py::module_::import("gfcoll.errors").attr(exception_name(e.code()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def("build_info", [] {
    py::dict d;
    py::list transports;
    transports.append("host");
#ifdef GFCOLL_WITH_IPC
    transports.append("ipc");
#endif
#ifdef GFCOLL_WITH_NCCL
    transports.append("nccl");
#endif
    d["transports"] = transports;
#ifdef GFCOLL_WITH_CUDA
    d["cuda"] = py::str(std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10));
    d["cuda_archs"] = py::str(GFCOLL_CUDA_ARCHS);
#else
    d["cuda"] = py::none();
    d["cuda_archs"] = py::none();
#endif
#ifdef GFCOLL_WITH_NCCL
    d["nccl_header"] = py::str(std::to_string(NCCL_MAJOR) + "." + std::to_string(NCCL_MINOR) + "." +
                               std::to_string(NCCL_PATCH));
#else
    d["nccl_header"] = py::none();
#endif
    return d;
  });

  py::class_<gfcoll::HostOptions>(m, "HostOptions")
      .def(py::init<>())
      .def_readwrite("num_slots", &gfcoll::HostOptions::num_slots)
      .def_readwrite("chunk_bytes", &gfcoll::HostOptions::chunk_bytes)
      .def_readwrite("timeout_s", &gfcoll::HostOptions::timeout_s);

  using HT = gfcoll::HostTransport;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<HT>(m, "HostTransport")
      .def(py::init<int, int, gfcoll::HostOptions>())
      .def("create_segment", &HT::create_segment)
      .def("attach", &HT::attach)
      .def("unlink_own", &HT::unlink_own)
      .def("close", &HT::close, nogil)
      .def("is_attached", &HT::is_attached)
      .def("num_leaked_slots", &HT::num_leaked_slots)
      .def(
          "all_gather",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
             uint64_t bytes, int dtype) {
            t.all_gather(key(g, e), members, me, ptr<void>(in), ptr<void>(out), bytes, DType(dtype));
          },
          nogil)
      .def(
          "all_to_all",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
             const std::vector<uint64_t>& in_off, const std::vector<uint64_t>& in_sz,
             const std::vector<uint64_t>& out_off, const std::vector<uint64_t>& out_sz, int dtype) {
            t.all_to_all(key(g, e), members, me, ptr<void>(in), ptr<void>(out), in_off, in_sz, out_off, out_sz,
                         DType(dtype));
          },
          nogil)
      .def(
          "reduce_scatter",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
             uint64_t count, int dtype, int op) {
            t.reduce_scatter(key(g, e), members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op));
          },
          nogil)
      .def(
          "all_reduce",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
             uint64_t count, int dtype, int op) {
            t.all_reduce(key(g, e), members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op));
          },
          nogil)
      .def(
          "broadcast",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me, int root, uintptr_t buf,
             uint64_t bytes, int dtype) {
            t.broadcast(key(g, e), members, me, root, ptr<void>(buf), bytes, DType(dtype));
          },
          nogil)
      .def(
          "barrier",
          [](HT& t, uint64_t g, uint64_t e, const std::vector<int>& members, int me) {
            t.barrier(key(g, e), members, me);
          },
          nogil)
      .def(
          "batch_p2p",
          // ops: (is_send, peer, ptr, bytes, pair_hash, seq)
          [](HT& t, const std::vector<std::tuple<bool, int, uintptr_t, uint64_t, uint64_t, uint64_t>>& ops) {
            std::vector<gfcoll::HostP2P> v;
            v.reserve(ops.size());
            for (const auto& [is_send, peer, p, bytes, pair, seq] : ops) {
              v.push_back({is_send, peer, ptr<void>(p), bytes, StreamKey{pair, seq, 0}});
            }
            t.batch_p2p(v);
          },
          nogil);

#ifdef GFCOLL_WITH_CUDA
  py::class_<CudaEvent>(m, "CudaEvent")
      .def(py::init<>())
      .def("record", &CudaEvent::record)
      .def("query", &CudaEvent::query)
      .def("wait", &CudaEvent::wait)
      .def("synchronize", &CudaEvent::synchronize, nogil);
  m.def("cuda_device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
  });
#endif


#ifdef GFCOLL_WITH_IPC
  py::class_<gfcoll::IpcOptions>(m, "IpcOptions")
      .def(py::init<>())
      .def_readwrite("workspace_bytes", &gfcoll::IpcOptions::workspace_bytes)
      .def_readwrite("timeout_s", &gfcoll::IpcOptions::timeout_s)
      .def_readwrite("one_shot_bytes", &gfcoll::IpcOptions::one_shot_bytes);
  using IT = gfcoll::IpcTransport;
  // The collectives hold the GIL: they only enqueue work (tens of microseconds), and releasing and
  // re-taking it would cost more than it frees.
  py::class_<IT>(m, "IpcTransport")
      .def(py::init<int, int, int, gfcoll::IpcOptions>())
      .def("handle", [](IT& t) { return py::bytes(t.handle()); })
      .def("attach",
           [](IT& t, const std::vector<int>& ranks, const std::vector<py::bytes>& handles,
              const std::vector<int64_t>& pids) {
             std::vector<std::string> hs(handles.begin(), handles.end());
             py::gil_scoped_release release;
             t.attach(ranks, hs, pids);
           })
      .def("close", &IT::close, nogil)
      .def_property_readonly("abandoned", &IT::abandoned)
      .def("is_local", &IT::is_local)
      .def("staging_bytes", &IT::staging_bytes)
      .def("check", &IT::check)
      .def("graph_slot", &IT::graph_slot)
      .def("bind", [](IT& t, int slot, const std::vector<int>& members, int me, int epoch,
                      uintptr_t stream) { t.bind(slot, members, me, epoch, stream); })
      .def("all_gather",
           [](IT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t bytes,
              uintptr_t stream, int slot) { t.all_gather(members, me, ptr<void>(in), ptr<void>(out), bytes, stream, slot); })
      .def("all_to_all",
           [](IT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
              const std::vector<uint64_t>& in_off, const std::vector<uint64_t>& in_sz,
              const std::vector<uint64_t>& out_off, const std::vector<uint64_t>& out_sz, uintptr_t stream, int slot) {
             t.all_to_all(members, me, ptr<void>(in), ptr<void>(out), in_off, in_sz, out_off, out_sz, stream, slot);
           })
      .def("reduce_scatter",
           [](IT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t count, int dtype,
              int op, uintptr_t stream, int slot) {
             t.reduce_scatter(members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op), stream, slot);
           })
      .def("all_reduce",
           [](IT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t count, int dtype,
              int op, uintptr_t stream, int slot) {
             t.all_reduce(members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op), stream, slot);
           })
      .def("broadcast",
           [](IT& t, const std::vector<int>& members, int me, int root, uintptr_t buf, uint64_t bytes,
              uintptr_t stream, int slot) { t.broadcast(members, me, root, ptr<void>(buf), bytes, stream, slot); })
      .def("barrier", [](IT& t, const std::vector<int>& members, int me, uintptr_t stream,
                         int slot) { t.barrier(members, me, stream, slot); })
      .def("batch_p2p",
           // ops: (is_send, peer, ptr, bytes)
           [](IT& t, const std::vector<std::tuple<bool, int, uintptr_t, uint64_t>>& ops, uintptr_t stream) {
             std::vector<gfcoll::IpcP2P> v;
             v.reserve(ops.size());
             for (const auto& [is_send, peer, p, bytes] : ops) v.push_back({is_send, peer, ptr<void>(p), bytes});
             t.batch_p2p(v, stream);
           });
#endif

#ifdef GFCOLL_WITH_NCCL
  using NT = gfcoll::NcclTransport;
  py::class_<NT>(m, "NcclTransport")
      .def(py::init<const std::string&>())
      .def_static("default_library", &NT::default_library)
      .def("library_path", &NT::library_path)
      .def("version", &NT::version)
      .def("unique_id", [](NT& t) { return py::bytes(t.unique_id()); })
      .def(
          "init", [](NT& t, int rank, int size, const py::bytes& id, int device) {
            std::string s = id;
            py::gil_scoped_release release;
            t.init(rank, size, s, device);
          })
      .def("warmup", &NT::warmup, nogil)
      .def("device", &NT::device)
      .def("check_async_error", &NT::check_async_error)
      .def("start_watchdog", &NT::start_watchdog)
      .def("check", &NT::check)
      .def("close", &NT::close, py::arg("abort") = false, nogil)
      .def("comm_handle", &NT::comm_handle, nogil)
      .def("adopt", &NT::adopt, py::arg("comm"), py::arg("comm_rank_of"), nogil)
      .def(
          "all_gather",
          [](NT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t bytes,
             uintptr_t stream) { t.all_gather(members, me, ptr<void>(in), ptr<void>(out), bytes, stream); },
          nogil)
      .def(
          "all_to_all",
          [](NT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out,
             const std::vector<uint64_t>& in_off, const std::vector<uint64_t>& in_sz,
             const std::vector<uint64_t>& out_off, const std::vector<uint64_t>& out_sz, uintptr_t stream) {
            t.all_to_all(members, me, ptr<void>(in), ptr<void>(out), in_off, in_sz, out_off, out_sz, stream);
          },
          nogil)
      .def(
          "reduce_scatter",
          [](NT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t count, int dtype,
             int op, uintptr_t stream) {
            t.reduce_scatter(members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op), stream);
          },
          nogil)
      .def(
          "all_reduce",
          [](NT& t, const std::vector<int>& members, int me, uintptr_t in, uintptr_t out, uint64_t count, int dtype,
             int op, uintptr_t stream) {
            t.all_reduce(members, me, ptr<void>(in), ptr<void>(out), count, DType(dtype), RedOp(op), stream);
          },
          nogil)
      .def(
          "broadcast",
          [](NT& t, const std::vector<int>& members, int me, int root, uintptr_t buf, uint64_t bytes,
             uintptr_t stream) { t.broadcast(members, me, root, ptr<void>(buf), bytes, stream); },
          nogil)
      .def(
          "batch_p2p",
          // ops: (is_send, peer, ptr, bytes)
          [](NT& t, const std::vector<std::tuple<bool, int, uintptr_t, uint64_t>>& ops, uintptr_t stream) {
            std::vector<gfcoll::NcclP2P> v;
            v.reserve(ops.size());
            for (const auto& [is_send, peer, p, bytes] : ops) v.push_back({is_send, peer, ptr<void>(p), bytes});
            t.batch_p2p(v, stream);
          },
          nogil);
#endif
}
