// Batched small symmetric eigensolver: every same-size n×n problem of a batch in one call to
// cuSOLVER's cusolverDnXsyevBatched (64-bit API, divide and conquer, cuSOLVER >= 11.7.1).
//
// Why not link cuSOLVER: the extension must build and import where no cuSOLVER header or library
// exists (the CPU CI builds it with nvcc alone), and at run time it must use the cuSOLVER the
// process already has (torch's, from the nvidia-cusolver wheel) rather than a second copy. So this
// file declares the handful of types and entry points it calls, and resolves them with dlopen/dlsym
// at first use: a library torch already loaded first (RTLD_NOLOAD), then the paths Python passes
// (the wheel's lib folders), then the sonames on the system search path. Every failure becomes a
// reason string (library not found, symbol missing: cuSOLVER too old) that r2m_fast/small_eigh.py
// reports and falls back on torch.linalg.eigh with.
//
// The declarations follow cuSOLVER's public API (cusolverDn.h / cusolver_common.h, CUDA 12.6+):
// handles are opaque pointers, enums are C ints. cudaDataType and libraryPropertyType come from
// library_types.h, which ships with the CUDA runtime headers, not with cuSOLVER.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "r2m_cuda.h"

namespace r2m {
namespace {

// ---- the subset of cuSOLVER's API used here (see the file comment) ----------------------------
struct cusolverDnContext;
struct cusolverDnParams;
using DnHandle = cusolverDnContext*;
using DnParams = cusolverDnParams*;
using Status = int;  // cusolverStatus_t
constexpr Status kStatusSuccess = 0;
constexpr int kEigModeVector = 1;  // CUSOLVER_EIG_MODE_VECTOR
constexpr int kFillUpper = 1;      // CUBLAS_FILL_MODE_UPPER

using CreateFn = Status (*)(DnHandle*);
using SetStreamFn = Status (*)(DnHandle, cudaStream_t);
using CreateParamsFn = Status (*)(DnParams*);
using GetPropertyFn = Status (*)(libraryPropertyType, int*);
using BufferSizeFn = Status (*)(DnHandle, DnParams, int /*jobz*/, int /*uplo*/, int64_t n, cudaDataType typeA,
                                const void* A, int64_t lda, cudaDataType typeW, const void* W,
                                cudaDataType computeType, size_t* deviceBytes, size_t* hostBytes, int64_t batch);
using SyevBatchedFn = Status (*)(DnHandle, DnParams, int /*jobz*/, int /*uplo*/, int64_t n, cudaDataType typeA,
                                 void* A, int64_t lda, cudaDataType typeW, void* W, cudaDataType computeType,
                                 void* deviceWork, size_t deviceBytes, void* hostWork, size_t hostBytes, int* info,
                                 int64_t batch);

const char* status_name(Status s) {
  switch (s) {
    case 0: return "CUSOLVER_STATUS_SUCCESS";
    case 1: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case 2: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case 3: return "CUSOLVER_STATUS_INVALID_VALUE";
    case 4: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case 5: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case 6: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case 7: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case 8: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case 9: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolverStatus_t";
  }
}

struct Api {
  void* lib = nullptr;
  std::string path;     // the file the symbols resolved from (dladdr)
  std::string version;  // "major.minor.patch", or "" when cusolverGetProperty is missing
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  CreateParamsFn create_params = nullptr;
  BufferSizeFn buffer_size = nullptr;
  SyevBatchedFn syev_batched = nullptr;
};

// Per device: one handle and params object for the process lifetime, and the host workspace.
// They are never destroyed: at interpreter exit the driver may already be torn down, and a
// cusolverDnDestroy then can crash; the OS reclaims them.
struct DeviceState {
  DnHandle handle = nullptr;
  DnParams params = nullptr;
  std::vector<char> host_work;
};

std::mutex g_mutex;
bool g_tried = false;
Api g_api;
std::string g_error;  // why the API is unusable; empty when it loaded
std::vector<DeviceState> g_devices;

template <typename F>
bool resolve(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

// Try one candidate with dlopen `flags`; on success fill g_api and return "", else the reason.
std::string try_open(const std::string& name, int flags) {
  dlerror();
  void* lib = dlopen(name.c_str(), flags);
  if (lib == nullptr) {
    const char* e = dlerror();
    return e ? e : "dlopen failed";
  }
  Api api;
  api.lib = lib;
  if (!resolve(lib, "cusolverDnCreate", &api.create) || !resolve(lib, "cusolverDnSetStream", &api.set_stream) ||
      !resolve(lib, "cusolverDnCreateParams", &api.create_params)) {
    dlclose(lib);
    return name + " is not a cuSOLVER library (no cusolverDnCreate/SetStream/CreateParams)";
  }
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(api.create), &info) != 0 && info.dli_fname != nullptr) api.path = info.dli_fname;
  else api.path = name;
  GetPropertyFn get_property = nullptr;
  if (resolve(lib, "cusolverGetProperty", &get_property)) {
    int major = 0, minor = 0, patch = 0;
    if (get_property(MAJOR_VERSION, &major) == kStatusSuccess && get_property(MINOR_VERSION, &minor) == kStatusSuccess &&
        get_property(PATCH_LEVEL, &patch) == kStatusSuccess) {
      api.version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
    }
  }
  if (!resolve(lib, "cusolverDnXsyevBatched_bufferSize", &api.buffer_size) ||
      !resolve(lib, "cusolverDnXsyevBatched", &api.syev_batched)) {
    // Keep the library loaded (torch may use it); only this entry point is missing.
    return "cuSOLVER " + (api.version.empty() ? std::string("of unknown version") : api.version) + " at " +
           api.path + " has no cusolverDnXsyevBatched (it needs cuSOLVER >= 11.7.1, CUDA >= 12.6 Update 2)";
  }
  g_api = api;
  return "";
}

}  // namespace

std::string small_eigh_load(const std::vector<std::string>& candidates) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_tried && g_error.empty()) return g_error;  // loaded: for good (a failure may be retried with other candidates)
  g_tried = true;
  // 1. A cuSOLVER the process already loaded (torch's): the same copy, no second runtime state.
  // 2. The candidates as given (wheel paths, then sonames on the search path).
  std::string tried;
  std::string missing_symbol;  // a library that loaded but is too old: the most useful reason
  for (int pass = 0; pass < 2; ++pass) {
    const int flags = pass == 0 ? (RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD) : (RTLD_NOW | RTLD_LOCAL);
    for (const std::string& name : candidates) {
      std::string why = try_open(name, flags);
      if (why.empty()) {
        g_error.clear();
        return g_error;
      }
      if (why.find("cusolverDnXsyevBatched") != std::string::npos) missing_symbol = why;
      else if (pass == 1) tried += (tried.empty() ? "" : "; ") + why;
    }
  }
  g_error = !missing_symbol.empty()
                ? missing_symbol
                : "no cuSOLVER library could be loaded (" + (tried.empty() ? std::string("no candidates") : tried) + ")";
  return g_error;
}

std::string small_eigh_library() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_tried || !g_error.empty()) return "";
  return g_api.path + (g_api.version.empty() ? "" : " (cuSOLVER " + g_api.version + ")");
}

namespace {

void check_status(Status s, const char* stage) {
  if (s != kStatusSuccess) {
    throw std::runtime_error(std::string("small_eigh: ") + stage + " failed with " + status_name(s) + " (" +
                             std::to_string(s) + ")");
  }
}

// The device's handle bound to `stream`; call with g_mutex held.
DeviceState& device_state(int device, cudaStream_t stream) {
  if (!g_tried || !g_error.empty()) {
    throw std::runtime_error("small_eigh: cuSOLVER is not loaded (" +
                             (g_tried ? g_error : std::string("small_eigh_load was not called")) + ")");
  }
  if (device < 0 || device > 1024) throw std::runtime_error("small_eigh: bad device index " + std::to_string(device));
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("small_eigh: cudaSetDevice failed: ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
  if (g_devices.size() <= size_t(device)) g_devices.resize(size_t(device) + 1);
  DeviceState& st = g_devices[size_t(device)];
  if (st.handle == nullptr) {
    check_status(g_api.create(&st.handle), "cusolverDnCreate");
    check_status(g_api.create_params(&st.params), "cusolverDnCreateParams");
  }
  check_status(g_api.set_stream(st.handle, stream), "cusolverDnSetStream");
  return st;
}

cudaDataType data_type(int dtype) {
  if (dtype == kFloat32) return CUDA_R_32F;
  if (dtype == kFloat64) return CUDA_R_64F;
  throw std::runtime_error("small_eigh: dtype code " + std::to_string(dtype) + " is not float32 or float64");
}

void check_sizes(int64_t n, int64_t batch) {
  if (n < 1 || n > (int64_t(1) << 20)) throw std::runtime_error("small_eigh: n must be in [1, 2^20], got " + std::to_string(n));
  if (batch < 1) throw std::runtime_error("small_eigh: batch must be >= 1, got " + std::to_string(batch));
}

}  // namespace

std::tuple<int64_t, int64_t> small_eigh_buffer_size(uintptr_t a, uintptr_t w, int64_t n, int64_t batch, int dtype,
                                                    int device, uintptr_t stream) {
  check_sizes(n, batch);
  const cudaDataType t = data_type(dtype);
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState& st = device_state(device, reinterpret_cast<cudaStream_t>(stream));
  size_t device_bytes = 0, host_bytes = 0;
  check_status(g_api.buffer_size(st.handle, st.params, kEigModeVector, kFillUpper, n, t, reinterpret_cast<const void*>(a),
                                 n, t, reinterpret_cast<const void*>(w), t, &device_bytes, &host_bytes, batch),
               "cusolverDnXsyevBatched_bufferSize");
  return {int64_t(device_bytes), int64_t(host_bytes)};
}

void small_eigh(uintptr_t a, uintptr_t w, int64_t n, int64_t batch, int dtype, uintptr_t work, int64_t work_bytes,
                uintptr_t info, int device, uintptr_t stream_handle) {
  check_sizes(n, batch);
  const cudaDataType t = data_type(dtype);
  if (a == 0 || w == 0 || info == 0) throw std::runtime_error("small_eigh: a, w and info must be device pointers");
  if (work_bytes < 0 || (work_bytes > 0 && work == 0)) {
    throw std::runtime_error("small_eigh: work must hold work_bytes = " + std::to_string(work_bytes) + " bytes");
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState& st = device_state(device, stream);
  size_t device_bytes = 0, host_bytes = 0;
  check_status(g_api.buffer_size(st.handle, st.params, kEigModeVector, kFillUpper, n, t, reinterpret_cast<void*>(a), n,
                                 t, reinterpret_cast<void*>(w), t, &device_bytes, &host_bytes, batch),
               "cusolverDnXsyevBatched_bufferSize");
  if (int64_t(device_bytes) > work_bytes) {
    throw std::runtime_error("small_eigh: the device workspace holds " + std::to_string(work_bytes) +
                             " bytes; cuSOLVER asks for " + std::to_string(device_bytes));
  }
  if (st.host_work.size() < host_bytes) {
    // An earlier call on this stream may still read the old host buffer: let it finish first.
    cudaError_t err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("small_eigh: cudaStreamSynchronize failed: ") + cudaGetErrorName(err));
    }
    st.host_work.resize(host_bytes);
  }
  // The upper triangle of a column-major matrix is the lower triangle of the row-major one: the
  // triangle torch.linalg.eigh reads by default (UPLO="L"), so both see the same numbers.
  check_status(g_api.syev_batched(st.handle, st.params, kEigModeVector, kFillUpper, n, t, reinterpret_cast<void*>(a), n,
                                  t, reinterpret_cast<void*>(w), t, reinterpret_cast<void*>(work), size_t(work_bytes),
                                  host_bytes ? st.host_work.data() : nullptr, host_bytes, reinterpret_cast<int*>(info),
                                  batch),
               "cusolverDnXsyevBatched");
  if (std::getenv("R2M_CUDA_SYNC") != nullptr && std::string(std::getenv("R2M_CUDA_SYNC")) != "0") {
    cudaError_t err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("small_eigh: cusolverDnXsyevBatched execution failed: ") +
                               cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
    }
  }
}

}  // namespace r2m
