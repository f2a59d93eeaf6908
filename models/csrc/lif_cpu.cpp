// CPU kernels of torch.ops.deepspike.lif and lif_backward, and the checks of their arguments (registered here;
// fake, autograd and CUDA kernels are registered in models/lif_op.py, and the CUDA and fake kernels call the
// same checks through torch.ops.deepspike.lif_check / lif_backward_check). Semantics are those of
// models.neuron.lif_sequence_reference, operation for operation, so results are bit-identical:
// models/csrc/build.py compiles it with -ffp-contract=off because a fused multiply-add in u * decay + x would
// round once where the reference rounds twice.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

// Importing deepspike_ops runs the TORCH_LIBRARY registrations below; the module itself is empty.
extern "C" PyObject* PyInit_deepspike_ops(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "deepspike_ops", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace deepspike {
namespace {

constexpr uint8_t kSpike = 1;
constexpr uint8_t kWindow = 2;
// Neurons per block: the block's membrane stays in L1 while the loop walks over T, and the inner loop
// over contiguous neurons is what the compiler vectorises.
constexpr int64_t kBlock = 512;

// Element access for the kernels. bf16 goes through its raw bits: c10::BFloat16's conversions branch on NaN,
// which stops the compiler from vectorising the loops. The rounding is c10's (nearest even, NaN -> 0x7FC0),
// so results equal a torch cast. fp16 keeps c10's scalar conversions (rare on CPU; correct, not vectorised).
template <typename scalar_t>
struct Elem {
  using storage = scalar_t;
  using acc = at::opmath_type<scalar_t>;
  static acc load(storage v) { return static_cast<acc>(v); }
  static storage store(acc v) { return static_cast<storage>(v); }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;
  using acc = float;
  static acc load(storage v) { return std::bit_cast<float>(uint32_t(v) << 16); }
  static storage store(acc v) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint16_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return v != v ? uint16_t(0x7FC0) : rounded;
  }
};

// The per-step loops are compiled for AVX-512, AVX2 and baseline x86-64, and the loader picks the best the CPU
// has (GCC function multi-versioning): one build serves every node.
#define DEEPSPIKE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// One step of a block of n neurons. The spike state is not stored: s_{t-1} = u_{t-1} > v_th is recomputed,
// which keeps the loop free of a second array. `first` is t = 0, where u = x exactly. A NaN membrane emits a
// NaN spike (NaN > v_th is false, so it would otherwise be silence), and stays NaN for the rest of the sequence.
template <bool first, typename E>
DEEPSPIKE_VECTOR_CLONES void lif_step(const typename E::storage* __restrict__ xt, typename E::storage* __restrict__ st,
                     uint8_t* __restrict__ ct, typename E::acc* __restrict__ u, int64_t n, typename E::acc decay,
                     typename E::acc v_th, typename E::acc lens) {
  using acc_t = typename E::acc;
  const typename E::storage one = E::store(1), zero = E::store(0),
                            nan = E::store(std::numeric_limits<acc_t>::quiet_NaN());
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = E::load(xt[i]);
    const acc_t v = first ? x : ((u[i] > v_th ? acc_t(0) : u[i] * decay) + x);
    const bool s = v > v_th;
    u[i] = v;
    st[i] = s ? one : (v == v ? zero : nan);
    ct[i] = uint8_t(s) | (uint8_t(std::abs(v - v_th) < lens) << 1);
  }
}

// Where the kernels find neuron m's value at step t in a dense tensor of any layout (contiguous, channels_last or
// another permutation): the dims laid out inside the time dim form `inner` consecutive elements, those outside it
// repeat the whole [T, inner] block `outer` times, so the offset is (m / inner) * T * inner + t * inner + m % inner.
struct TimeLayout {
  int64_t T, inner, outer;
  explicit TimeLayout(const at::Tensor& t)
      : T(t.size(0)), inner(T > 1 ? t.stride(0) : t.numel()), outer(T * inner != 0 ? t.numel() / (T * inner) : 0) {}
};

// Runs step(offset of neuron m at t = 0, n) over the neurons in blocks of at most kBlock consecutive elements.
template <typename F>
void for_each_block(const TimeLayout& l, F step) {
  at::parallel_for(0, l.outer * l.inner, kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end;) {
      const int64_t i = m % l.inner, n = std::min({kBlock, end - m, l.inner - i});
      step((m / l.inner) * l.T * l.inner + i, n);
      m += n;
    }
  });
}

template <typename scalar_t>
void lif_forward_cpu(const scalar_t* x_, scalar_t* spikes_, uint8_t* code, const TimeLayout& l,
                     double decay_, double v_th_, double lens_) {
  using E = Elem<scalar_t>;
  using acc_t = typename E::acc;
  const auto* x = reinterpret_cast<const typename E::storage*>(x_);
  auto* spikes = reinterpret_cast<typename E::storage*>(spikes_);
  const acc_t decay = decay_, v_th = v_th_, lens = lens_;
  for_each_block(l, [&](int64_t b, int64_t n) {
    acc_t u[kBlock];
    lif_step<true, E>(x + b, spikes + b, code + b, u, n, decay, v_th, lens);
    for (int64_t t = 1; t < l.T; ++t) {
      const int64_t o = b + t * l.inner;
      lif_step<false, E>(x + o, spikes + o, code + o, u, n, decay, v_th, lens);
    }
  });
}

// One step back in time: grad_x[t] = (window ? grad[t] * height : 0) + carry, then the carry through the leak,
// carry = s_{t-1} ? 0 : g * decay (prev = code[t-1]; there is none at t = 0).
template <bool has_prev, typename E>
DEEPSPIKE_VECTOR_CLONES void lif_step_back(const typename E::storage* __restrict__ gt, const uint8_t* __restrict__ ct,
                          const uint8_t* __restrict__ prev, typename E::storage* __restrict__ gxt,
                          typename E::acc* __restrict__ carry, int64_t n, typename E::acc decay,
                          typename E::acc height) {
  using acc_t = typename E::acc;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t surrogate = E::load(gt[i]) * height;  // loaded unconditionally, so the loop vectorises
    const acc_t g = ((ct[i] & kWindow) ? surrogate : acc_t(0)) + carry[i];
    gxt[i] = E::store(g);
    if constexpr (has_prev) carry[i] = (prev[i] & kSpike) ? acc_t(0) : g * decay;
  }
}

template <typename scalar_t>
void lif_backward_cpu(const scalar_t* grad_, const uint8_t* code, scalar_t* grad_x_, const TimeLayout& l,
                      double decay_, double lens_) {
  using E = Elem<scalar_t>;
  using acc_t = typename E::acc;
  const auto* grad = reinterpret_cast<const typename E::storage*>(grad_);
  auto* grad_x = reinterpret_cast<typename E::storage*>(grad_x_);
  const acc_t decay = decay_, height = 1.0 / (2.0 * lens_);
  for_each_block(l, [&](int64_t b, int64_t n) {
    // dL/du_{t+1} * du_{t+1}/du_t. It starts at -0, the additive identity of every float (+0 is not:
    // -0 + +0 = +0), so the last step's gradient is exactly the reference's, which adds nothing there.
    acc_t carry[kBlock];
    std::fill_n(carry, n, acc_t(-0.0));
    for (int64_t t = l.T - 1; t > 0; --t) {
      const int64_t o = b + t * l.inner;
      lif_step_back<true, E>(grad + o, code + o, code + o - l.inner, grad_x + o, carry, n, decay, height);
    }
    lif_step_back<false, E>(grad + b, code + b, nullptr, grad_x + b, carry, n, decay, height);
  });
}

// The one check of the ops' arguments, on every device: the CPU kernels below call it, the CUDA and fake kernels
// (models/lif_op.py) through lif_check / lif_backward_check. Only metadata is read, so it runs on meta and fake
// tensors too. v_th is absent for lif_backward, which does not take it.
void check_args(const char* op, const at::Tensor& t, const char* name, double decay, std::optional<double> v_th,
                double lens) {
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must be [T, ...], got a 0-d tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   op, ": ", name, " must be a floating tensor (float64, float32, bfloat16 or float16), got ", dtype);
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ", decay);
  TORCH_CHECK_VALUE(!v_th || std::isfinite(*v_th), op, ": v_th must be finite, got ", v_th.value_or(0.0));
  TORCH_CHECK_VALUE(std::isfinite(lens) && lens > 0.0, op, ": lens (the surrogate half-width) must be finite and > 0, got ",
                    lens);
}

void lif_check(const at::Tensor& x, double decay, double v_th, double lens) {
  check_args("deepspike::lif", x, "x", decay, v_th, lens);
}

void lif_backward_check(const at::Tensor& grad, const at::Tensor& code, double decay, double lens) {
  check_args("deepspike::lif_backward", grad, "grad_spikes", decay, std::nullopt, lens);
  TORCH_CHECK_TYPE(code.scalar_type() == at::kByte, "deepspike::lif_backward: code must be uint8, got ",
                   code.scalar_type());
  TORCH_CHECK_VALUE(code.sizes() == grad.sizes(), "deepspike::lif_backward: code has shape ", code.sizes(),
                    ", grad_spikes ", grad.sizes());
}

// t itself where it is dense (any layout: no copy), else a copy in the layout empty_like chooses for it. The
// outputs are empty_like(the input the kernel reads), which is what the fake kernels return too.
at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : at::empty_like(t).copy_(t); }

std::tuple<at::Tensor, at::Tensor> lif_cpu(const at::Tensor& x_, double decay, double v_th, double lens) {
  lif_check(x_, decay, v_th, lens);
  const at::Tensor x = dense(x_);
  at::Tensor spikes = at::empty_like(x);
  at::Tensor code = at::empty_like(x, x.options().dtype(at::kByte));
  const TimeLayout layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "deepspike::lif", [&] {
    lif_forward_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), spikes.mutable_data_ptr<scalar_t>(),
                              code.mutable_data_ptr<uint8_t>(), layout, decay, v_th, lens);
  });
  return {spikes, code};
}

at::Tensor lif_backward_cpu_op(const at::Tensor& grad_, const at::Tensor& code_, double decay, double lens) {
  lif_backward_check(grad_, code_, decay, lens);
  const at::Tensor code = dense(code_);
  // The incoming gradient in code's layout (a copy only where autograd delivers another one).
  const at::Tensor grad = grad_.strides() == code.strides() ? grad_ : at::empty_like(code, grad_.options()).copy_(grad_);
  at::Tensor grad_x = at::empty_like(grad);
  const TimeLayout layout(code);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "deepspike::lif_backward", [&] {
    lif_backward_cpu<scalar_t>(grad.const_data_ptr<scalar_t>(), code.const_data_ptr<uint8_t>(),
                               grad_x.mutable_data_ptr<scalar_t>(), layout, decay, lens);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY(deepspike, m) {
  m.def("lif(Tensor x, float decay, float v_th, float lens) -> (Tensor spikes, Tensor code)");
  m.def("lif_backward(Tensor grad_spikes, Tensor code, float decay, float lens) -> Tensor");
  m.def("lif_check(Tensor x, float decay, float v_th, float lens) -> ()");
  m.def("lif_backward_check(Tensor grad_spikes, Tensor code, float decay, float lens) -> ()");
}

TORCH_LIBRARY_IMPL(deepspike, CPU, m) {
  m.impl("lif", &lif_cpu);
  m.impl("lif_backward", &lif_backward_cpu_op);
}

// Above autograd and fake tensors: the checks read metadata only, on any device.
TORCH_LIBRARY_IMPL(deepspike, CompositeImplicitAutograd, m) {
  m.impl("lif_check", &lif_check);
  m.impl("lif_backward_check", &lif_backward_check);
}

}  // namespace deepspike
