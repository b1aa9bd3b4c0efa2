// titans_cuda._C: a thin pybind11 layer over the launchers. It knows nothing of libtorch:
// tensors arrive as raw device addresses, sizes, element strides and a cudaStream_t handle
// (torch.cuda.current_stream().cuda_stream), the GIL is released while launching, and every
// CUDA error becomes a RuntimeError that names the op.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../memory_mlp/memory_mlp.h"
#include "../memory_scan/memory_scan.h"
#include "../neural_memory/chunked.h"
#include "../neural_memory/chunked_bwd.h"
#include "../neural_memory/decode.h"

namespace py = pybind11;

#ifndef TITANS_CUDA_ARCHS
#define TITANS_CUDA_ARCHS "unknown"
#endif

namespace {

void check(cudaError_t status, const char* op) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("titans_cuda.") + op + ": CUDA error " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void memory_scan_fwd(std::uintptr_t updates, int64_t updates_b_stride, int64_t updates_h_stride,
                     int64_t updates_c_stride, std::uintptr_t forget, int64_t forget_b_stride,
                     int64_t forget_c_stride, int64_t forget_h_stride, std::uintptr_t momentum,
                     int64_t momentum_b_stride, int64_t momentum_c_stride,
                     int64_t momentum_h_stride, std::uintptr_t initial_weights,
                     int64_t initial_weights_b_stride, int64_t initial_weights_h_stride,
                     std::uintptr_t initial_momentum, int64_t initial_momentum_b_stride,
                     int64_t initial_momentum_h_stride, std::uintptr_t weights_out,
                     std::uintptr_t momentum_out, int batch, int heads, int n_chunks,
                     int64_t elements, std::uintptr_t stream, int device) {
  titans::MemoryScanFwdParams p{};
  p.updates = as_ptr<const float>(updates);
  p.updates_b_stride = updates_b_stride;
  p.updates_h_stride = updates_h_stride;
  p.updates_c_stride = updates_c_stride;
  p.forget = as_ptr<const float>(forget);
  p.forget_b_stride = forget_b_stride;
  p.forget_c_stride = forget_c_stride;
  p.forget_h_stride = forget_h_stride;
  p.momentum = as_ptr<const float>(momentum);
  p.momentum_b_stride = momentum_b_stride;
  p.momentum_c_stride = momentum_c_stride;
  p.momentum_h_stride = momentum_h_stride;
  p.initial_weights = as_ptr<const float>(initial_weights);
  p.initial_weights_b_stride = initial_weights_b_stride;
  p.initial_weights_h_stride = initial_weights_h_stride;
  p.initial_momentum = as_ptr<const float>(initial_momentum);
  p.initial_momentum_b_stride = initial_momentum_b_stride;
  p.initial_momentum_h_stride = initial_momentum_h_stride;
  p.weights_out = as_ptr<float>(weights_out);
  p.momentum_out = as_ptr<float>(momentum_out);
  p.batch = batch;
  p.heads = heads;
  p.n_chunks = n_chunks;
  p.elements = elements;
  check(titans::memory_scan_fwd(p, reinterpret_cast<cudaStream_t>(stream), device),
        "memory_scan");
}

void memory_scan_bwd(std::uintptr_t grad_weights, std::uintptr_t grad_momentum,
                     std::uintptr_t updates, int64_t updates_b_stride, int64_t updates_h_stride,
                     int64_t updates_c_stride, std::uintptr_t forget, int64_t forget_b_stride,
                     int64_t forget_c_stride, int64_t forget_h_stride, std::uintptr_t momentum,
                     int64_t momentum_b_stride, int64_t momentum_c_stride,
                     int64_t momentum_h_stride, std::uintptr_t initial_weights,
                     int64_t initial_weights_b_stride, int64_t initial_weights_h_stride,
                     std::uintptr_t initial_momentum, int64_t initial_momentum_b_stride,
                     int64_t initial_momentum_h_stride, std::uintptr_t weights,
                     std::uintptr_t grad_updates, std::uintptr_t grad_forget,
                     std::uintptr_t grad_momentum_gate, std::uintptr_t grad_initial_weights,
                     std::uintptr_t grad_initial_momentum, std::uintptr_t checkpoints,
                     std::uintptr_t gate_partials, int batch, int heads, int n_chunks,
                     int64_t elements, std::uintptr_t stream, int device) {
  titans::MemoryScanBwdParams p{};
  p.grad_weights = as_ptr<const float>(grad_weights);
  p.grad_momentum = as_ptr<const float>(grad_momentum);
  p.updates = as_ptr<const float>(updates);
  p.updates_b_stride = updates_b_stride;
  p.updates_h_stride = updates_h_stride;
  p.updates_c_stride = updates_c_stride;
  p.forget = as_ptr<const float>(forget);
  p.forget_b_stride = forget_b_stride;
  p.forget_c_stride = forget_c_stride;
  p.forget_h_stride = forget_h_stride;
  p.momentum = as_ptr<const float>(momentum);
  p.momentum_b_stride = momentum_b_stride;
  p.momentum_c_stride = momentum_c_stride;
  p.momentum_h_stride = momentum_h_stride;
  p.initial_weights = as_ptr<const float>(initial_weights);
  p.initial_weights_b_stride = initial_weights_b_stride;
  p.initial_weights_h_stride = initial_weights_h_stride;
  p.initial_momentum = as_ptr<const float>(initial_momentum);
  p.initial_momentum_b_stride = initial_momentum_b_stride;
  p.initial_momentum_h_stride = initial_momentum_h_stride;
  p.weights = as_ptr<const float>(weights);
  p.grad_updates = as_ptr<float>(grad_updates);
  p.grad_forget = as_ptr<float>(grad_forget);
  p.grad_momentum_gate = as_ptr<float>(grad_momentum_gate);
  p.grad_initial_weights = as_ptr<float>(grad_initial_weights);
  p.grad_initial_momentum = as_ptr<float>(grad_initial_momentum);
  p.checkpoints = as_ptr<float>(checkpoints);
  p.gate_partials = as_ptr<float>(gate_partials);
  p.batch = batch;
  p.heads = heads;
  p.n_chunks = n_chunks;
  p.elements = elements;
  check(titans::memory_scan_bwd(p, reinterpret_cast<cudaStream_t>(stream), device),
        "memory_scan backward");
}

py::dict memory_scan_bwd_scratch(int batch, int heads, int n_chunks, int64_t elements) {
  py::dict out;
  out["checkpoints"] =
      titans::memory_scan_bwd_checkpoint_floats(batch, heads, n_chunks, elements);
  out["gate_partials"] = titans::memory_scan_bwd_partial_floats(batch, heads, n_chunks, elements);
  return out;
}

// The memory-MLP and decode kernels take many optional operands, so their arguments come as one
// dict: pointers (0 = absent) and element strides by name, as their headers document them.
template <typename T>
T arg(const py::dict& args, const char* name) {
  if (!args.contains(name)) throw std::invalid_argument(std::string("titans_cuda._C: missing argument ") + name);
  return args[name].cast<T>();
}

// Runs launch(stream, device) (from the dict's "stream" and "device") with the GIL released;
// a CUDA error becomes a RuntimeError naming `op`.
template <typename Launch>
void launch_released(const py::dict& a, const char* op, Launch&& launch) {
  const auto stream = reinterpret_cast<cudaStream_t>(arg<std::uintptr_t>(a, "stream"));
  const int device = arg<int>(a, "device");
  cudaError_t status;
  {
    py::gil_scoped_release release;
    status = launch(stream, device);
  }
  check(status, op);
}

void memory_mlp(const py::dict& a) {
  titans::MemoryMlpParams p{};
  auto ptr = [&](const char* name) { return arg<std::uintptr_t>(a, name); };
  auto i64 = [&](const char* name) { return arg<int64_t>(a, name); };
  auto i32 = [&](const char* name) { return arg<int>(a, name); };
  p.x = as_ptr<const void>(ptr("x"));
  p.x_b_stride = i64("x_b_stride"), p.x_t_stride = i64("x_t_stride");
  p.x_h_stride = i64("x_h_stride");
  p.v = as_ptr<const void>(ptr("v"));
  p.v_b_stride = i64("v_b_stride"), p.v_t_stride = i64("v_t_stride");
  p.v_h_stride = i64("v_h_stride");
  p.lr = as_ptr<const float>(ptr("lr"));
  p.lr_b_stride = i64("lr_b_stride"), p.lr_t_stride = i64("lr_t_stride");
  p.lr_h_stride = i64("lr_h_stride");
  p.grad_y = as_ptr<const void>(ptr("grad_y"));
  p.grad_y_b_stride = i64("grad_y_b_stride"), p.grad_y_t_stride = i64("grad_y_t_stride");
  p.grad_y_h_stride = i64("grad_y_h_stride");
  p.w1 = as_ptr<const float>(ptr("w1"));
  p.w1_b_stride = i64("w1_b_stride"), p.w1_h_stride = i64("w1_h_stride");
  p.w1_c_stride = i64("w1_c_stride");
  p.w2 = as_ptr<const float>(ptr("w2"));
  p.w2_b_stride = i64("w2_b_stride"), p.w2_h_stride = i64("w2_h_stride");
  p.w2_c_stride = i64("w2_c_stride");
  p.shifted = arg<bool>(a, "shifted");
  p.w1_first = as_ptr<const float>(ptr("w1_first"));
  p.w1_first_b_stride = i64("w1_first_b_stride"), p.w1_first_h_stride = i64("w1_first_h_stride");
  p.w2_first = as_ptr<const float>(ptr("w2_first"));
  p.w2_first_b_stride = i64("w2_first_b_stride"), p.w2_first_h_stride = i64("w2_first_h_stride");
  p.u1_first = as_ptr<float>(ptr("u1_first"));
  p.u2_first = as_ptr<float>(ptr("u2_first"));
  p.ln_weight = as_ptr<const float>(ptr("ln_weight"));
  p.ln_bias = as_ptr<const float>(ptr("ln_bias"));
  p.ln_eps = arg<float>(a, "ln_eps");
  p.y = as_ptr<void>(ptr("y"));
  p.grad_x = as_ptr<void>(ptr("grad_x"));
  p.grad_v = as_ptr<void>(ptr("grad_v"));
  p.grad_lr = as_ptr<float>(ptr("grad_lr"));
  p.grad_u1 = as_ptr<const float>(ptr("grad_u1"));
  p.grad_u2 = as_ptr<const float>(ptr("grad_u2"));
  p.u1 = as_ptr<float>(ptr("u1"));
  p.u2 = as_ptr<float>(ptr("u2"));
  p.grad_ln = as_ptr<float>(ptr("grad_ln"));
  p.batch = i32("batch"), p.heads = i32("heads"), p.seqlen = i32("seqlen");
  p.dim = i32("dim"), p.hidden = i32("hidden"), p.depth = i32("depth");
  p.chunk = i32("chunk"), p.n_chunks = i32("n_chunks"), p.n_sub = i32("n_sub");
  p.activation = i32("activation");
  p.residual = arg<bool>(a, "residual");
  p.mode = static_cast<titans::MlpMode>(i32("mode"));
  p.dtype = static_cast<titans::MlpDtype>(i32("dtype"));
  launch_released(a, "memory_mlp", [&](cudaStream_t stream, int device) {
    return titans::memory_mlp(p, stream, device);
  });
}

// NeuralMemoryParams (neural_memory/params.h) from a dict of addresses / strides / sizes
// (ops/neural_memory/ops.py); per-layer pointers come as lists of length depth.
titans::NeuralMemoryParams neural_memory_params(const py::dict& a, const char* op) {
  titans::NeuralMemoryParams p{};
  auto ptr = [&](const char* name) { return arg<std::uintptr_t>(a, name); };
  auto i64 = [&](const char* name) { return arg<int64_t>(a, name); };
  auto i32 = [&](const char* name) { return arg<int>(a, name); };
  auto layers = [&](const char* name) { return arg<std::vector<int64_t>>(a, name); };
  p.q = as_ptr<const void>(ptr("q"));
  p.k = as_ptr<const void>(ptr("k"));
  p.v = as_ptr<const void>(ptr("v"));
  p.q_n_stride = i64("q_n_stride"), p.q_t_stride = i64("q_t_stride");
  p.q_h_stride = i64("q_h_stride");
  p.k_n_stride = i64("k_n_stride"), p.k_t_stride = i64("k_t_stride");
  p.k_h_stride = i64("k_h_stride");
  p.v_n_stride = i64("v_n_stride"), p.v_t_stride = i64("v_t_stride");
  p.v_h_stride = i64("v_h_stride");
  p.lr = as_ptr<const float>(ptr("lr"));
  p.forget = as_ptr<const float>(ptr("forget"));
  p.momentum = as_ptr<const float>(ptr("momentum"));
  p.cu_seqlens = as_ptr<const int64_t>(ptr("cu_seqlens"));
  p.depth = i32("depth");
  const std::string name = std::string("titans_cuda.") + op;
  if (p.depth < 1 || p.depth > titans::kNeuralMemoryMaxLayers) {
    throw std::invalid_argument(name + ": depth must be 1 or 2");
  }
  const auto w_in = layers("w_in"), w_in_n = layers("w_in_n_stride");
  const auto w_in_h = layers("w_in_h_stride"), s_in = layers("s_in"), cw_in = layers("cw_in");
  const auto w_out = layers("w_out"), s_out = layers("s_out"), cw_out = layers("cw_out");
  for (const auto* v : {&w_in, &w_in_n, &w_in_h, &s_in, &cw_in, &w_out, &s_out, &cw_out}) {
    if (v->size() != size_t(p.depth)) throw std::invalid_argument(name + ": one entry per layer");
  }
  for (int l = 0; l < p.depth; ++l) {
    p.w_in[l] = as_ptr<const float>(std::uintptr_t(w_in[l]));
    p.w_in_n_stride[l] = w_in_n[l], p.w_in_h_stride[l] = w_in_h[l];
    p.s_in[l] = as_ptr<const float>(std::uintptr_t(s_in[l]));
    p.cw_in[l] = as_ptr<const float>(std::uintptr_t(cw_in[l]));
    p.w_out[l] = as_ptr<float>(std::uintptr_t(w_out[l]));
    p.s_out[l] = as_ptr<float>(std::uintptr_t(s_out[l]));
    p.cw_out[l] = as_ptr<float>(std::uintptr_t(cw_out[l]));
  }
  p.offset = as_ptr<const int64_t>(ptr("offset"));
  p.ln_weight = as_ptr<const float>(ptr("ln_weight"));
  p.ln_bias = as_ptr<const float>(ptr("ln_bias"));
  p.ln_eps = arg<float>(a, "ln_eps");
  p.o = as_ptr<void>(ptr("o"));
  p.n_seq = i32("n_seq"), p.seqlen = i32("seqlen"), p.heads = i32("heads");
  p.dim = i32("dim"), p.hidden = i32("hidden"), p.chunk = i32("chunk");
  p.activation = i32("activation");
  p.residual = arg<bool>(a, "residual");
  p.read_chunk = arg<bool>(a, "read_chunk");
  p.dtype = i32("dtype");
  p.split = i32("split");
  if (a.contains("exchange")) {  // chunked only: a split over ordinary CTAs
    p.exchange = as_ptr<float>(ptr("exchange"));
    p.arrivals = as_ptr<unsigned>(ptr("arrivals"));
  }
  if (a.contains("read_z2")) {  // chunked only: the read's z2 and the keys' fk, written or
    p.read_z2 = as_ptr<float>(ptr("read_z2"));  // (backward) read
    p.keys_fk = as_ptr<float>(ptr("keys_fk"));
  }
  p.sub = a.contains("sub") ? i32("sub") : 1;  // chunked, depth 2: sub-chunks (params.h)
  if (a.contains("ckpt_every")) {  // chunked only
    p.ckpt_every = i32("ckpt_every");
    const auto ckpt_w = layers("ckpt_w"), ckpt_s = layers("ckpt_s");
    if (ckpt_w.size() != size_t(p.depth) || ckpt_s.size() != size_t(p.depth)) {
      throw std::invalid_argument(name + ": one checkpoint buffer per layer");
    }
    for (int l = 0; l < p.depth; ++l) {
      p.ckpt_w[l] = as_ptr<float>(std::uintptr_t(ckpt_w[l]));
      p.ckpt_s[l] = as_ptr<float>(std::uintptr_t(ckpt_s[l]));
    }
  }
  return p;
}

void neural_memory_decode(const py::dict& a) {
  const auto p = neural_memory_params(a, "neural_memory_decode");
  launch_released(a, "neural_memory_decode", [&](cudaStream_t stream, int device) {
    return titans::neural_memory_decode(p, stream, device);
  });
}

void neural_memory_chunked(const py::dict& a) {
  const auto p = neural_memory_params(a, "neural_memory_chunked");
  launch_released(a, "neural_memory_chunked", [&](cudaStream_t stream, int device) {
    return titans::neural_memory_chunked(p, stream, device);
  });
}

// The backward's arguments: the forward's (neural_memory_params, without outputs) plus its own
// (chunked_bwd.h), one pointer list per layer where the state has layers.
void neural_memory_chunked_bwd(const py::dict& a) {
  titans::NeuralMemoryBwdParams bp{};
  bp.f = neural_memory_params(a, "neural_memory_chunked_bwd");
  auto ptr = [&](const char* name) { return arg<std::uintptr_t>(a, name); };
  auto layers = [&](const char* name) {
    const auto v = arg<std::vector<int64_t>>(a, name);
    if (v.size() != size_t(bp.f.depth)) {
      throw std::invalid_argument(std::string("titans_cuda.neural_memory_chunked_bwd: ") + name +
                                  " needs one entry per layer");
    }
    return v;
  };
  const auto ckpt_w = layers("bwd_ckpt_w"), ckpt_s = layers("bwd_ckpt_s");
  const auto w_bar = layers("w_bar"), s_bar = layers("s_bar"), wg0 = layers("wg0_bar");
  const auto cw_bar = layers("cw_bar");
  for (int l = 0; l < bp.f.depth; ++l) {
    bp.ckpt_w[l] = as_ptr<const float>(std::uintptr_t(ckpt_w[l]));
    bp.ckpt_s[l] = as_ptr<const float>(std::uintptr_t(ckpt_s[l]));
    bp.w_bar[l] = as_ptr<float>(std::uintptr_t(w_bar[l]));
    bp.s_bar[l] = as_ptr<float>(std::uintptr_t(s_bar[l]));
    bp.wg0_bar[l] = as_ptr<float>(std::uintptr_t(wg0[l]));
    bp.cw_bar[l] = as_ptr<const float>(std::uintptr_t(cw_bar[l]));
  }
  if (bp.f.sub > 1) {  // sub-chunks (params.h)
    const auto carry = layers("wg_carry");
    for (int l = 0; l < bp.f.depth; ++l) bp.wg_carry[l] = as_ptr<float>(std::uintptr_t(carry[l]));
  }
  bp.o_bar = as_ptr<const void>(ptr("o_bar"));
  bp.dq = as_ptr<void>(ptr("dq"));
  bp.dk = as_ptr<void>(ptr("dk"));
  bp.dv = as_ptr<void>(ptr("dv"));
  bp.dlr = as_ptr<float>(ptr("dlr"));
  bp.dforget = as_ptr<float>(ptr("dforget"));
  bp.dmomentum = as_ptr<float>(ptr("dmomentum"));
  bp.dln_w = as_ptr<float>(ptr("dln_w"));
  bp.dln_b = as_ptr<float>(ptr("dln_b"));
  bp.scratch = as_ptr<float>(ptr("scratch"));
  bp.ring = as_ptr<float>(ptr("ring"));
  bp.exchange = as_ptr<float>(ptr("exchange"));
  bp.arrivals = as_ptr<unsigned>(ptr("arrivals"));
  launch_released(a, "neural_memory_chunked_bwd", [&](cudaStream_t stream, int device) {
    return titans::neural_memory_chunked_bwd(bp, stream, device);
  });
}

size_t memory_mlp_smem_bytes(int dtype, int dim, int hidden, int depth, int mode) {
  titans::MemoryMlpParams p{};
  p.dtype = static_cast<titans::MlpDtype>(dtype);
  p.dim = dim, p.hidden = hidden, p.depth = depth;
  p.mode = static_cast<titans::MlpMode>(mode);
  return titans::memory_mlp_smem_bytes(p);
}

// Whether the kernels in this binary can run on `device`: asks the runtime for the attributes
// of one kernel, which fails with cudaErrorNoKernelImageForDevice when no compiled
// architecture fits. Returns a dict with ok, error, binary_version and ptx_version.
py::dict kernel_image(int device) {
  py::dict out;
  cudaError_t status;
  cudaFuncAttributes attr{};
  {
    py::gil_scoped_release release;
    int previous = 0;
    status = cudaGetDevice(&previous);
    if (status == cudaSuccess) status = cudaSetDevice(device);
    if (status == cudaSuccess) {
      status = cudaFuncGetAttributes(&attr, titans::memory_scan_fwd_kernel_address());
      cudaSetDevice(previous);
    }
  }
  out["ok"] = status == cudaSuccess;
  out["error"] = status == cudaSuccess ? std::string() :
      std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  out["binary_version"] = attr.binaryVersion;
  out["ptx_version"] = attr.ptxVersion;
  cudaGetLastError();  // a failed query must not poison later launches' error checks
  return out;
}

py::dict build_info() {
  py::dict out;
  out["cuda_archs"] = std::string(TITANS_CUDA_ARCHS);
  out["cuda_runtime_compiled"] = CUDART_VERSION;
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  out["cuda_runtime"] = runtime;
  out["cuda_driver"] = driver;  // 0 when no driver is installed
  out["cudart_static"] = true;
  return out;
}

int smem_per_block_optin(int device) {
  int bytes = 0;
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  return bytes;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "titans_cuda CUDA kernels (raw pointers, no libtorch)";
  m.def("memory_scan_fwd", &memory_scan_fwd, py::arg("updates"), py::arg("updates_b_stride"),
        py::arg("updates_h_stride"), py::arg("updates_c_stride"), py::arg("forget"),
        py::arg("forget_b_stride"), py::arg("forget_c_stride"), py::arg("forget_h_stride"),
        py::arg("momentum"), py::arg("momentum_b_stride"), py::arg("momentum_c_stride"),
        py::arg("momentum_h_stride"), py::arg("initial_weights"),
        py::arg("initial_weights_b_stride"), py::arg("initial_weights_h_stride"),
        py::arg("initial_momentum"), py::arg("initial_momentum_b_stride"),
        py::arg("initial_momentum_h_stride"), py::arg("weights_out"), py::arg("momentum_out"),
        py::arg("batch"), py::arg("heads"), py::arg("n_chunks"), py::arg("elements"),
        py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "S_j = eta_j S_{j-1} - U_j, W_j = (1 - alpha_j) W_{j-1} + S_j for one layer.");
  m.def("memory_scan_bwd", &memory_scan_bwd, py::arg("grad_weights"),
        py::arg("grad_momentum"), py::arg("updates"), py::arg("updates_b_stride"),
        py::arg("updates_h_stride"), py::arg("updates_c_stride"), py::arg("forget"),
        py::arg("forget_b_stride"), py::arg("forget_c_stride"), py::arg("forget_h_stride"),
        py::arg("momentum"), py::arg("momentum_b_stride"), py::arg("momentum_c_stride"),
        py::arg("momentum_h_stride"), py::arg("initial_weights"),
        py::arg("initial_weights_b_stride"), py::arg("initial_weights_h_stride"),
        py::arg("initial_momentum"), py::arg("initial_momentum_b_stride"),
        py::arg("initial_momentum_h_stride"), py::arg("weights"), py::arg("grad_updates"),
        py::arg("grad_forget"), py::arg("grad_momentum_gate"), py::arg("grad_initial_weights"),
        py::arg("grad_initial_momentum"), py::arg("checkpoints"), py::arg("gate_partials"),
        py::arg("batch"), py::arg("heads"), py::arg("n_chunks"), py::arg("elements"),
        py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "The reverse scan of memory_scan for one layer (see memory_scan.h).");
  m.def("memory_scan_bwd_scratch", &memory_scan_bwd_scratch, py::arg("batch"),
        py::arg("heads"), py::arg("n_chunks"), py::arg("elements"),
        "Scratch floats memory_scan_bwd needs: checkpoints and gate partials.");
  m.def("memory_mlp", &memory_mlp, py::arg("args"),
        "The memory-MLP tile kernels (forward / grad / backward / grad-backward modes, see "
        "memory_mlp.h).");
  m.def("memory_mlp_supported", &titans::memory_mlp_supported, py::arg("dim"),
        py::arg("hidden"), py::arg("depth"));
  m.def("memory_mlp_smem_bytes", &memory_mlp_smem_bytes, py::arg("dtype"), py::arg("dim"),
        py::arg("hidden"), py::arg("depth"), py::arg("mode"),
        "Dynamic shared memory (bytes) of the memory-MLP kernel for this configuration; 0 when "
        "unsupported.");
  m.def("neural_memory_decode", &neural_memory_decode, py::arg("args"),
        "Token-by-token neural memory on the state for short calls (decode.h).");
  m.def("neural_memory_decode_supported", &titans::neural_memory_decode_supported,
        py::arg("dim"), py::arg("hidden"), py::arg("depth"));
  m.def("neural_memory_chunked", &neural_memory_chunked, py::arg("args"),
        "The chunked neural memory, one CTA per (sequence, head) (chunked.h).");
  m.def("neural_memory_chunked_supported", &titans::neural_memory_chunked_supported,
        py::arg("dim"), py::arg("hidden"), py::arg("depth"), py::arg("chunk"), py::arg("dtype"));
  m.def("neural_memory_chunked_exchange_floats",
        &titans::neural_memory_chunked_exchange_floats, py::arg("dim"), py::arg("chunk"),
        "fp32 exchange floats per (sequence, head) the forward's split over ordinary CTAs "
        "may use.");
  m.def("neural_memory_arrival_stride", &titans::neural_memory_arrival_stride,
        "int32 apart of the arrival counters of a split over ordinary CTAs.");
  m.def("neural_memory_chunked_smem_bytes", &titans::neural_memory_chunked_smem_bytes,
        py::arg("dim"), py::arg("hidden"), py::arg("depth"), py::arg("chunk"), py::arg("dtype"));
  m.def("neural_memory_chunked_bwd", &neural_memory_chunked_bwd, py::arg("args"),
        "The fused backward of the chunked neural memory (chunked_bwd.h).");
  m.def("neural_memory_chunked_bwd_supported", &titans::neural_memory_chunked_bwd_supported,
        py::arg("dim"), py::arg("hidden"), py::arg("depth"), py::arg("chunk"), py::arg("dtype"),
        py::arg("read_chunk"));
  m.def("neural_memory_chunked_bwd_smem_bytes", &titans::neural_memory_chunked_bwd_smem_bytes,
        py::arg("dim"), py::arg("hidden"), py::arg("depth"), py::arg("chunk"), py::arg("dtype"));
  m.def("neural_memory_chunked_bwd_scratch_floats",
        &titans::neural_memory_chunked_bwd_scratch_floats, py::arg("dim"), py::arg("hidden"),
        py::arg("depth"), py::arg("chunk"));
  m.def("neural_memory_chunked_bwd_plan", &titans::neural_memory_chunked_bwd_plan,
        py::arg("n_seq"), py::arg("heads"), py::arg("dim"), py::arg("hidden"), py::arg("chunk"),
        py::arg("dtype"), py::arg("split"), py::arg("device"),
        "The backward launcher's split for a request (0: its choice); negative: ordinary CTAs "
        "exchanging through global memory; 0 when the request cannot run.");
  m.def("neural_memory_chunked_bwd_exchange_floats",
        &titans::neural_memory_chunked_bwd_exchange_floats, py::arg("dim"), py::arg("chunk"),
        py::arg("split"));
  m.def("memory_mlp_tile_rows", [] { return titans::kMlpTileRows; });
  m.def("kernel_image", &kernel_image, py::arg("device"));
  m.def("build_info", &build_info);
  m.def("device_count", &device_count);
  m.def("smem_per_block_optin", &smem_per_block_optin, py::arg("device"));
}
