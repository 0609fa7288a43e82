// pycfg._nccl: the per-step collective of a CFG group, straight on NCCL.
//
// libnccl is opened with dlopen at run time and the handful of NCCL types used here are declared below, so the
// module compiles without a CUDA toolkit, NCCL headers or torch's C++ libraries. Python hands over raw device
// pointers, element counts, NCCL dtype codes and the caller's CUDA stream handle; nothing here synchronises the
// host with the device, so every call can be captured in a CUDA graph.
//
// Failing fast: every NCCL result is checked and raised with NCCL's own strings. Communicators are created
// non-blocking where NCCL supports it (>= 2.14), so initialisation and enqueueing are polled under a timeout and
// aborted instead of hanging. A small ring of CUDA events (driver API, also opened at run time) bounds how many
// of this communicator's collectives may be unfinished: waiting on the oldest one, under the same timeout and
// while polling NCCL's asynchronous error, turns a peer that died mid-collective into an exception.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// ---- the slice of nccl.h this module relies on (ABI-stable since NCCL 2.11) ----
using ncclResult = int;
using ncclCommHandle = void*;
using cudaStreamHandle = void*;
struct ncclUniqueIdBlob {
  char internal[128];
};

constexpr ncclResult kSuccess = 0;
constexpr ncclResult kSystemError = 2;
constexpr ncclResult kRemoteError = 6;
constexpr ncclResult kInProgress = 7;
constexpr int kRedSum = 0;
constexpr int kScalarDevice = 0;
// Our own code for "gave up waiting": NCCL's codes are all >= 0.
constexpr int kTimeoutCode = -1;

// Prefix of ncclConfig_t shared by every NCCL >= 2.17. NCCL copies `size` bytes of the caller's struct over its
// defaults and ignores fields newer than `version`, so a shorter, older struct is read correctly by newer NCCL.
struct ncclConfigPrefix {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
};
static_assert(sizeof(ncclConfigPrefix) == 40, "ncclConfig_t prefix layout");
constexpr unsigned int kConfigMagic = 0xcafebeef;
constexpr unsigned int kConfigVersion = 21700;  // NCCL_VERSION(2, 17, 0)

struct NcclApi {
  void* handle = nullptr;
  int version = 0;
  ncclResult (*GetVersion)(int*) = nullptr;
  ncclResult (*GetUniqueId)(ncclUniqueIdBlob*) = nullptr;
  ncclResult (*CommInitRank)(ncclCommHandle*, int, ncclUniqueIdBlob, int) = nullptr;
  ncclResult (*CommInitRankConfig)(ncclCommHandle*, int, ncclUniqueIdBlob, int, ncclConfigPrefix*) = nullptr;
  ncclResult (*CommDestroy)(ncclCommHandle) = nullptr;
  ncclResult (*CommFinalize)(ncclCommHandle) = nullptr;
  ncclResult (*CommAbort)(ncclCommHandle) = nullptr;
  ncclResult (*CommGetAsyncError)(ncclCommHandle, ncclResult*) = nullptr;
  const char* (*GetErrorString)(ncclResult) = nullptr;
  const char* (*GetLastError)(ncclCommHandle) = nullptr;
  ncclResult (*AllReduce)(const void*, void*, size_t, int, int, ncclCommHandle, cudaStreamHandle) = nullptr;
  ncclResult (*AllGather)(const void*, void*, size_t, int, ncclCommHandle, cudaStreamHandle) = nullptr;
  ncclResult (*RedOpCreatePreMulSum)(int*, void*, int, int, ncclCommHandle) = nullptr;
  ncclResult (*RedOpDestroy)(int, ncclCommHandle) = nullptr;
  ncclResult (*GroupStart)() = nullptr;
  ncclResult (*GroupEnd)() = nullptr;
};

// CUDA driver API, only for the event ring; absent libcuda just disables it.
struct CudaApi {
  bool loaded = false;
  int (*EventCreate)(void**, unsigned int) = nullptr;
  int (*EventRecord)(void*, void*) = nullptr;
  int (*EventQuery)(void*) = nullptr;
  int (*EventDestroy)(void*) = nullptr;
  int (*StreamIsCapturing)(void*, int*) = nullptr;
};
constexpr int kCudaNotReady = 600;
constexpr unsigned int kEventDisableTiming = 0x2;

NcclApi g_nccl;
CudaApi g_cuda;
std::string g_library_path;
PyObject* g_error_type = nullptr;

struct NcclFailure {
  int code;
  std::string message;
};

std::string version_string(int v) {
  int major, minor, patch;
  if (v >= 10000) {
    major = v / 10000; minor = (v % 10000) / 100; patch = v % 100;
  } else {  // the scheme before NCCL 2.9
    major = v / 1000; minor = (v % 1000) / 100; patch = v % 100;
  }
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

template <typename F>
void resolve(void* lib, const char* name, F& fn, bool required) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && required) {
    throw NcclFailure{kTimeoutCode - 1, std::string("the NCCL library at ") + g_library_path + " lacks " + name +
                                            " (pycfg needs NCCL >= 2.11)"};
  }
}

void load_cuda_driver() {
  if (g_cuda.loaded) return;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return;
  g_cuda.EventCreate = reinterpret_cast<decltype(g_cuda.EventCreate)>(dlsym(lib, "cuEventCreate"));
  g_cuda.EventRecord = reinterpret_cast<decltype(g_cuda.EventRecord)>(dlsym(lib, "cuEventRecord"));
  g_cuda.EventQuery = reinterpret_cast<decltype(g_cuda.EventQuery)>(dlsym(lib, "cuEventQuery"));
  g_cuda.EventDestroy = reinterpret_cast<decltype(g_cuda.EventDestroy)>(dlsym(lib, "cuEventDestroy_v2"));
  g_cuda.StreamIsCapturing =
      reinterpret_cast<decltype(g_cuda.StreamIsCapturing)>(dlsym(lib, "cuStreamIsCapturing"));
  g_cuda.loaded = g_cuda.EventCreate && g_cuda.EventRecord && g_cuda.EventQuery && g_cuda.EventDestroy &&
                  g_cuda.StreamIsCapturing;
}

// Opens libnccl once; returns its version code (ncclGetVersion). Raises NcclError with dlerror's text.
int load(const std::string& path) {
  if (g_nccl.handle) return g_nccl.version;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    throw NcclFailure{kTimeoutCode - 1, std::string("cannot load NCCL: ") + (why ? why : path)};
  }
  g_library_path = path;
  NcclApi api;
  api.handle = lib;
  try {
    resolve(lib, "ncclGetVersion", api.GetVersion, true);
    int v = 0;
    if (api.GetVersion(&v) != kSuccess) throw NcclFailure{kTimeoutCode - 1, "ncclGetVersion failed"};
    api.version = v;
    if (v < 21100) {
      throw NcclFailure{kTimeoutCode - 1, "NCCL " + version_string(v) + " (" + path +
                                              ") is older than 2.11, which pycfg needs for ncclRedOpCreatePreMulSum; "
                                              "install a newer NCCL or pass comm=\"torch\""};
    }
    resolve(lib, "ncclGetUniqueId", api.GetUniqueId, true);
    resolve(lib, "ncclCommInitRank", api.CommInitRank, true);
    resolve(lib, "ncclCommInitRankConfig", api.CommInitRankConfig, false);
    resolve(lib, "ncclCommDestroy", api.CommDestroy, true);
    resolve(lib, "ncclCommFinalize", api.CommFinalize, false);
    resolve(lib, "ncclCommAbort", api.CommAbort, true);
    resolve(lib, "ncclCommGetAsyncError", api.CommGetAsyncError, true);
    resolve(lib, "ncclGetErrorString", api.GetErrorString, true);
    resolve(lib, "ncclGetLastError", api.GetLastError, false);
    resolve(lib, "ncclAllReduce", api.AllReduce, true);
    resolve(lib, "ncclAllGather", api.AllGather, true);
    resolve(lib, "ncclRedOpCreatePreMulSum", api.RedOpCreatePreMulSum, true);
    resolve(lib, "ncclRedOpDestroy", api.RedOpDestroy, true);
    resolve(lib, "ncclGroupStart", api.GroupStart, true);
    resolve(lib, "ncclGroupEnd", api.GroupEnd, true);
  } catch (...) {
    dlclose(lib);
    throw;
  }
  g_nccl = api;
  load_cuda_driver();
  return g_nccl.version;
}

void require_loaded() {
  if (!g_nccl.handle) throw NcclFailure{kTimeoutCode - 1, "NCCL is not loaded: call pycfg._nccl.load() first"};
}

std::string describe(ncclResult r, ncclCommHandle comm) {
  const char* text = g_nccl.GetErrorString(r);
  std::string out = "NCCL error " + std::to_string(r) + " (" + (text ? text : "?") + ")";
  if (g_nccl.GetLastError) {
    const char* last = g_nccl.GetLastError(comm);
    if (last && *last) out += std::string(": ") + last;
  }
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Short spin, then sleeps that grow to 1 ms: quick to notice completion, cheap when waiting long.
void backoff(int& polls) {
  ++polls;
  if (polls < 64) {
    std::this_thread::yield();
  } else {
    int us = polls < 1024 ? 20 : 1000;
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
}

constexpr int kRingSize = 4;

class Communicator {
 public:
  Communicator(py::bytes unique_id, int nranks, int rank, bool blocking, double timeout)
      : nranks_(nranks), rank_(rank), timeout_(timeout) {
    require_loaded();
    std::string id = unique_id;
    if (id.size() != sizeof(ncclUniqueIdBlob)) throw std::invalid_argument("unique_id must be 128 bytes");
    ncclUniqueIdBlob blob;
    std::memcpy(blob.internal, id.data(), sizeof(blob.internal));
    blocking_ = blocking || !g_nccl.CommInitRankConfig;
    ncclResult r;
    {
      py::gil_scoped_release no_gil;  // peers may need this process's other threads (store, gloo) meanwhile
      if (g_nccl.CommInitRankConfig) {
        ncclConfigPrefix config{sizeof(ncclConfigPrefix), kConfigMagic, kConfigVersion, blocking_ ? 1 : 0,
                                INT_MIN, INT_MIN, INT_MIN, nullptr};
        r = g_nccl.CommInitRankConfig(&comm_, nranks, blob, rank, &config);
      } else {
        r = g_nccl.CommInitRank(&comm_, nranks, blob, rank);
      }
    }
    if (r != kSuccess && r != kInProgress) {
      std::string msg = describe(r, comm_);
      if (comm_) g_nccl.CommAbort(comm_);
      comm_ = nullptr;
      throw NcclFailure{r, "ncclCommInitRank (rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                               ") failed: " + msg};
    }
    settle("ncclCommInitRank");
  }

  ~Communicator() {
    // Destroying NCCL state at interpreter exit can deadlock against a torn-down CUDA runtime; close() is the
    // orderly path.
    for (void* ev : ring_)
      if (ev && g_cuda.loaded) g_cuda.EventDestroy(ev);
  }

  int rank() const { return rank_; }
  int size() const { return nranks_; }
  bool blocking() const { return blocking_; }
  bool aborted() const { return aborted_; }
  double timeout() const { return timeout_; }
  void set_timeout(double t) { timeout_ = t; }

  void all_reduce(uintptr_t send, uintptr_t recv, size_t count, int dtype, int op, uintptr_t stream) {
    before(stream);
    check(g_nccl.AllReduce(ptr(send), ptr(recv), count, dtype, op, comm_, ptr(stream)), "ncclAllReduce");
    after(stream);
  }

  // Sum over ranks of (this rank's scalar * data), the scalar read from device memory when the kernel runs, so
  // a captured graph replays with whatever the scalar holds then. The scalar has the data's type.
  void weighted_all_reduce(uintptr_t send, uintptr_t recv, size_t count, int dtype, uintptr_t scalar,
                           uintptr_t stream) {
    before(stream);
    premul_all_reduce(send, recv, count, dtype, scalar, stream);
    after(stream);
  }

  void all_gather(uintptr_t send, uintptr_t recv, size_t count, int dtype, uintptr_t stream) {
    before(stream);
    check(g_nccl.AllGather(ptr(send), ptr(recv), count, dtype, comm_, ptr(stream)), "ncclAllGather");
    after(stream);
  }

  // Several collectives fused into one NCCL group (one launch). Each entry is
  // (kind, send, recv, count, dtype, scalar) with kind 0 = sum all-reduce, 1 = weighted all-reduce (scalar is
  // the device pointer of its weight), 2 = all-gather.
  void group(const std::vector<std::tuple<int, uintptr_t, uintptr_t, size_t, int, uintptr_t>>& ops,
             uintptr_t stream) {
    before(stream);
    check(g_nccl.GroupStart(), "ncclGroupStart");
    ncclResult r = kSuccess;
    const char* what = "";
    // operators made inside the group join the cache only after the group is launched
    std::vector<std::pair<std::pair<uintptr_t, int>, int>> fresh_ops;
    for (const auto& [kind, send, recv, count, dtype, scalar] : ops) {
      if (kind == 0) {
        what = "ncclAllReduce";
        r = g_nccl.AllReduce(ptr(send), ptr(recv), count, dtype, kRedSum, comm_, ptr(stream));
      } else if (kind == 1) {
        int op = 0;
        auto found = premul_ops_.find(std::make_pair(scalar, dtype));
        if (found != premul_ops_.end()) {
          op = found->second;
        } else {
          what = "ncclRedOpCreatePreMulSum";
          r = g_nccl.RedOpCreatePreMulSum(&op, ptr(scalar), dtype, kScalarDevice, comm_);
          if (r != kSuccess) break;
          fresh_ops.emplace_back(std::make_pair(scalar, dtype), op);
        }
        what = "ncclAllReduce";
        r = g_nccl.AllReduce(ptr(send), ptr(recv), count, dtype, op, comm_, ptr(stream));
      } else if (kind == 2) {
        what = "ncclAllGather";
        r = g_nccl.AllGather(ptr(send), ptr(recv), count, dtype, comm_, ptr(stream));
      } else {
        GroupEndQuietly();
        throw std::invalid_argument("unknown collective kind " + std::to_string(kind));
      }
      if (r != kSuccess && r != kInProgress) break;
    }
    // A started group must be ended before anything else touches the communicator, even after a failed member.
    ncclResult end = g_nccl.GroupEnd();
    if (r == kSuccess || r == kInProgress) {
      if (premul_ops_.size() + fresh_ops.size() > kMaxPremulOps) drop_premul_ops();
      for (const auto& entry : fresh_ops) premul_ops_.insert(entry);
    } else {
      for (const auto& entry : fresh_ops) g_nccl.RedOpDestroy(entry.second, comm_);
    }
    if (r != kSuccess && r != kInProgress) fail(r, what);
    check(end, "ncclGroupEnd");
    after(stream);
  }

  // Raises if NCCL reports an asynchronous error (a network failure, a peer's abort); never blocks.
  void check_async() {
    if (aborted_) throw_aborted();
    ncclResult state = kSuccess;
    ncclResult r = g_nccl.CommGetAsyncError(comm_, &state);
    if (r != kSuccess) fail(r, "ncclCommGetAsyncError");
    if (state != kSuccess && state != kInProgress) fail(state, "asynchronous NCCL error");
  }

  // Waits, under the timeout, until every collective this communicator enqueued outside graph capture has run.
  void synchronize() {
    if (aborted_) throw_aborted();
    for (int i = 0; i < kRingSize; ++i) wait_event((head_ + i) % kRingSize);
    check_async();
  }

  void abort() {
    if (comm_ && !aborted_) {
      aborted_ = true;
      py::gil_scoped_release no_gil;
      g_nccl.CommAbort(comm_);
    }
  }

  // Orderly teardown: finalize (flushes outstanding work), then destroy. Idempotent.
  void close() {
    if (!comm_) return;
    if (aborted_) {
      comm_ = nullptr;
      return;
    }
    try {
      synchronize();
      drop_premul_ops();
      if (g_nccl.CommFinalize) {
        ncclResult r = g_nccl.CommFinalize(comm_);
        if (r != kSuccess && r != kInProgress) fail(r, "ncclCommFinalize");
        settle("ncclCommFinalize");
      }
    } catch (...) {
      abort();
      comm_ = nullptr;
      throw;
    }
    ncclResult r;
    {
      py::gil_scoped_release no_gil;
      r = g_nccl.CommDestroy(comm_);
    }
    comm_ = nullptr;
    if (r != kSuccess) throw NcclFailure{r, "ncclCommDestroy failed: " + describe(r, nullptr)};
  }

  std::string last_error() const {
    if (!g_nccl.GetLastError) return "";
    const char* s = g_nccl.GetLastError(comm_);
    return s ? s : "";
  }

 private:
  std::string where() const {
    return " on rank " + std::to_string(rank_) + " of " + std::to_string(nranks_);
  }

  static std::string seconds(double t) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%gs", t);
    return buf;
  }

  static void GroupEndQuietly() { (void)g_nccl.GroupEnd(); }

  static void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

  [[noreturn]] void throw_aborted() const {
    throw NcclFailure{kTimeoutCode, "this NCCL communicator was aborted after an earlier failure; create a new one"};
  }

  [[noreturn]] void fail(ncclResult r, const char* what) {
    std::string msg = std::string(what) + " failed on rank " + std::to_string(rank_) + " of " +
                      std::to_string(nranks_) + ": " + describe(r, comm_);
    abort();  // NCCL requires it after a fatal error, and a non-blocking comm is unusable after any
    throw NcclFailure{r, msg + "; communicator aborted"};
  }

  void check(ncclResult r, const char* what) {
    if (r == kSuccess) return;
    if (r == kInProgress) {
      settle(what);
      return;
    }
    fail(r, what);
  }

  // A non-blocking communicator finishes some calls in the background: poll until done, failed or timed out.
  void settle(const char* what) {
    ncclResult state = kInProgress;
    auto start = std::chrono::steady_clock::now();
    int polls = 0;
    bool timed_out = false;
    {
      py::gil_scoped_release no_gil;
      for (;;) {
        ncclResult r = g_nccl.CommGetAsyncError(comm_, &state);
        if (r != kSuccess) {
          state = r;
          break;
        }
        if (state != kInProgress) break;
        if (seconds_since(start) > timeout_) {
          timed_out = true;
          break;
        }
        backoff(polls);
      }
    }
    if (timed_out) {
      abort();
      throw NcclFailure{kTimeoutCode, std::string(what) + where() + " did not complete within " + seconds(timeout_) +
                                          " (a peer rank is missing, died or is stuck); communicator aborted"};
    }
    if (state != kSuccess) fail(state, what);
  }

  // PreMulSum operators are cached per (scalar address, dtype): creating one costs far more than the collective's
  // launch. The operator holds only the address, read at run time, so reusing it for whatever tensor lives there
  // later is exactly right.
  int premul_op(uintptr_t scalar, int dtype) {
    auto key = std::make_pair(scalar, dtype);
    auto found = premul_ops_.find(key);
    if (found != premul_ops_.end()) return found->second;
    if (premul_ops_.size() >= kMaxPremulOps) drop_premul_ops();
    int op = 0;
    check(g_nccl.RedOpCreatePreMulSum(&op, ptr(scalar), dtype, kScalarDevice, comm_), "ncclRedOpCreatePreMulSum");
    premul_ops_.emplace(key, op);
    return op;
  }

  // NCCL allows destroying an operator once the calls that used it have returned (captured graphs included).
  void drop_premul_ops() {
    for (const auto& entry : premul_ops_) g_nccl.RedOpDestroy(entry.second, comm_);
    premul_ops_.clear();
  }

  void premul_all_reduce(uintptr_t send, uintptr_t recv, size_t count, int dtype, uintptr_t scalar,
                         uintptr_t stream) {
    int op = premul_op(scalar, dtype);
    check(g_nccl.AllReduce(ptr(send), ptr(recv), count, dtype, op, comm_, ptr(stream)), "ncclAllReduce");
  }

  bool capturing(uintptr_t stream) {
    if (!g_cuda.loaded) return true;  // no driver API: treat like capture, i.e. no event ring
    int status = 0;
    if (g_cuda.StreamIsCapturing(ptr(stream), &status) != 0) return true;
    return status != 0;
  }

  // Before enqueueing: fail fast on a known error, and keep at most kRingSize collectives in flight.
  void before(uintptr_t stream) {
    if (aborted_) throw_aborted();
    if (!comm_) throw NcclFailure{kTimeoutCode - 1, "this NCCL communicator is closed"};
    track_ = !capturing(stream);
    if (track_) wait_event(head_);
  }

  void after(uintptr_t stream) {
    if (!track_) return;
    void*& ev = ring_[head_];
    if (!ev && g_cuda.EventCreate(&ev, kEventDisableTiming) != 0) {
      ev = nullptr;
      return;
    }
    if (g_cuda.EventRecord(ev, ptr(stream)) == 0) pending_[head_] = true;
    head_ = (head_ + 1) % kRingSize;
  }

  void wait_event(int slot) {
    if (!pending_[slot]) return;
    void* ev = ring_[slot];
    int q = g_cuda.EventQuery(ev);
    if (q == kCudaNotReady) {
      auto start = std::chrono::steady_clock::now();
      int polls = 0;
      ncclResult state = kSuccess;
      bool timed_out = false;
      {
        py::gil_scoped_release no_gil;
        while ((q = g_cuda.EventQuery(ev)) == kCudaNotReady) {
          if (g_nccl.CommGetAsyncError(comm_, &state) != kSuccess || (state != kSuccess && state != kInProgress))
            break;
          if (seconds_since(start) > timeout_) {
            timed_out = true;
            break;
          }
          backoff(polls);
        }
      }
      if (timed_out) {
        abort();
        throw NcclFailure{kTimeoutCode, "an NCCL collective" + where() + " did not finish within " +
                                            seconds(timeout_) +
                                            " (a peer rank died or stopped calling collectives); communicator aborted"};
      }
      if (state != kSuccess && state != kInProgress) fail(state, "asynchronous NCCL error");
    }
    pending_[slot] = false;
    // Other CUDA errors (e.g. a sticky launch failure) are torch's to report on its next call.
  }

  ncclCommHandle comm_ = nullptr;
  int nranks_;
  int rank_;
  double timeout_;
  bool blocking_ = true;
  bool aborted_ = false;
  bool track_ = false;
  std::map<std::pair<uintptr_t, int>, int> premul_ops_;
  static constexpr size_t kMaxPremulOps = 64;
  void* ring_[kRingSize] = {nullptr, nullptr, nullptr, nullptr};
  bool pending_[kRingSize] = {false, false, false, false};
  int head_ = 0;
};

}  // namespace

PYBIND11_MODULE(_nccl, m) {
  m.doc() = "pycfg's NCCL communicator (libnccl opened at run time; raw pointers and stream handles)";

  g_error_type = PyErr_NewException("pycfg._nccl.NcclError", PyExc_RuntimeError, nullptr);
  m.attr("NcclError") = py::handle(g_error_type);
  m.attr("TIMEOUT") = kTimeoutCode;
  m.attr("UNAVAILABLE") = kTimeoutCode - 1;
  m.attr("SYSTEM_ERROR") = kSystemError;
  m.attr("REMOTE_ERROR") = kRemoteError;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NcclFailure& f) {
      py::object err = py::reinterpret_borrow<py::object>(g_error_type)(f.message);
      err.attr("code") = f.code;
      PyErr_SetObject(g_error_type, err.ptr());
    }
  });

  m.def("built", []() { return true; });
  m.def("load", &load, py::arg("path"),
        "Open libnccl at `path` (once) and return ncclGetVersion's code; raises NcclError if unusable.");
  m.def("loaded_path", []() { return g_library_path; });
  m.def("version_string", &version_string);
  m.def("has_event_ring", []() { return g_cuda.loaded; });
  m.def("unique_id", []() {
    require_loaded();
    ncclUniqueIdBlob blob;
    ncclResult r = g_nccl.GetUniqueId(&blob);
    if (r != kSuccess) throw NcclFailure{r, "ncclGetUniqueId failed: " + describe(r, nullptr)};
    return py::bytes(blob.internal, sizeof(blob.internal));
  });
  m.def("error_string", [](int code) {
    require_loaded();
    return std::string(g_nccl.GetErrorString(code));
  });

  py::class_<Communicator>(m, "Communicator")
      .def(py::init<py::bytes, int, int, bool, double>(), py::arg("unique_id"), py::arg("nranks"), py::arg("rank"),
           py::arg("blocking") = false, py::arg("timeout") = 600.0)
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("blocking", &Communicator::blocking)
      .def_property_readonly("aborted", &Communicator::aborted)
      .def_property("timeout", &Communicator::timeout, &Communicator::set_timeout)
      .def("all_reduce", &Communicator::all_reduce)
      .def("weighted_all_reduce", &Communicator::weighted_all_reduce)
      .def("all_gather", &Communicator::all_gather)
      .def("group", &Communicator::group)
      .def("check_async", &Communicator::check_async)
      .def("synchronize", &Communicator::synchronize)
      .def("abort", &Communicator::abort)
      .def("close", &Communicator::close)
      .def("last_error", &Communicator::last_error);
}
