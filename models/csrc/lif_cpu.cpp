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
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

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
//
// The packed code (the one description of its layout; models/lif_triton.py follows it): 2 bits per neuron and
// step (bit 0 spiked, bit 1 inside the surrogate window), 4 neurons per byte, neuron i of a row in bits
// 2 * (i % 4) of byte i / 4. A row is one (outer, t) pair's `inner` neurons, padded with zero bits to whole bytes,
// so the code is a contiguous uint8 tensor [outer, T, ceil(inner / 4)]. Kernel blocks start at a multiple of 4
// neurons inside a row and therefore write whole bytes: no two blocks share one.
struct TimeLayout {
  int64_t T, inner, outer, row_bytes;
  explicit TimeLayout(const at::Tensor& t)
      : T(t.size(0)), inner(T > 1 ? t.stride(0) : t.numel()), outer(T * inner != 0 ? t.numel() / (T * inner) : 0),
        row_bytes((inner + 3) / 4) {}
};

// The shape of the packed code of a dense tensor t (TimeLayout's arithmetic on symbolic sizes, for the checks that
// also run under tracing).
std::vector<c10::SymInt> packed_shape(const at::Tensor& t) {
  const c10::SymInt T = t.sym_size(0), inner = T > 1 ? t.sym_stride(0) : t.sym_numel();
  const c10::SymInt outer = T * inner != 0 ? t.sym_numel() / (T * inner) : c10::SymInt(0);
  return {outer, T, (inner + 3) / 4};
}

// Packs n per-neuron codes (2 bits each) into ceil(n / 4) bytes; the slots past n are zero.
inline void pack_codes(const uint8_t* __restrict__ c, uint8_t* __restrict__ packed, int64_t n) {
  const int64_t whole = n / 4;
  for (int64_t j = 0; j < whole; ++j)
    packed[j] = c[4 * j] | (c[4 * j + 1] << 2) | (c[4 * j + 2] << 4) | (c[4 * j + 3] << 6);
  if (n % 4) {
    uint8_t last = 0;
    for (int64_t k = 0; k < n % 4; ++k) last |= c[4 * whole + k] << (2 * k);
    packed[whole] = last;
  }
}

// Neuron i's 2-bit code in a packed row.
inline uint8_t packed_code(const uint8_t* packed, int64_t i) { return (packed[i / 4] >> (2 * (i % 4))) & 3; }

// Unpacks n codes of a packed row, from neuron 0 of `packed`, into c.
inline void unpack_codes(const uint8_t* __restrict__ packed, uint8_t* __restrict__ c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) c[i] = packed_code(packed, i);
}

// Runs step(offset of the block's first neuron at t = 0 in the tensor, the same in the packed code, n) over the
// neurons in blocks of at most kBlock consecutive elements, each starting at a multiple of 4 inside its row.
template <typename F>
void for_each_block(const TimeLayout& l, F step) {
  at::parallel_for(0, l.outer * l.row_bytes, kBlock / 4, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end;) {  // q: a byte of the rows at t = 0, i.e. 4 neurons
      const int64_t o = q / l.row_bytes, j = q % l.row_bytes;
      const int64_t quads = std::min({kBlock / 4, end - q, l.row_bytes - j});
      step(o * l.T * l.inner + 4 * j, o * l.T * l.row_bytes + j, std::min(4 * quads, l.inner - 4 * j));
      q += quads;
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
  for_each_block(l, [&](int64_t b, int64_t p, int64_t n) {
    acc_t u[kBlock];
    uint8_t c[kBlock];  // one byte per neuron for the vectorised step, packed after it
    lif_step<true, E>(x + b, spikes + b, c, u, n, decay, v_th, lens);
    pack_codes(c, code + p, n);
    for (int64_t t = 1; t < l.T; ++t) {
      const int64_t o = b + t * l.inner;
      lif_step<false, E>(x + o, spikes + o, c, u, n, decay, v_th, lens);
      pack_codes(c, code + p + t * l.row_bytes, n);
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
  for_each_block(l, [&](int64_t b, int64_t p, int64_t n) {
    // dL/du_{t+1} * du_{t+1}/du_t. It starts at -0, the additive identity of every float (+0 is not:
    // -0 + +0 = +0), so the last step's gradient is exactly the reference's, which adds nothing there.
    acc_t carry[kBlock];
    std::fill_n(carry, n, acc_t(-0.0));
    uint8_t buf[2][kBlock];  // the codes of steps t and t - 1, unpacked
    uint8_t *ct = buf[0], *prev = buf[1];
    unpack_codes(code + p + (l.T - 1) * l.row_bytes, ct, n);
    for (int64_t t = l.T - 1; t > 0; --t) {
      unpack_codes(code + p + (t - 1) * l.row_bytes, prev, n);
      const int64_t o = b + t * l.inner;
      lif_step_back<true, E>(grad + o, ct, prev, grad_x + o, carry, n, decay, height);
      std::swap(ct, prev);
    }
    lif_step_back<false, E>(grad + b, ct, nullptr, grad_x + b, carry, n, decay, height);
  });
}

// One row of a packed code's spikes (bit 0) as 0/1 values.
template <typename E>
DEEPSPIKE_VECTOR_CLONES void code_spikes_row(const uint8_t* __restrict__ packed, typename E::storage* __restrict__ out,
                                             int64_t n) {
  const typename E::storage one = E::store(1), zero = E::store(0);
  for (int64_t i = 0; i < n; ++i) out[i] = (packed_code(packed, i) & kSpike) ? one : zero;
}

// The spikes of a packed code as a 0/1 tensor: `rows` rows of `inner` consecutive elements of out's memory.
template <typename scalar_t>
void code_spikes_cpu(const uint8_t* code, scalar_t* out_, int64_t rows, int64_t inner, int64_t row_bytes) {
  using E = Elem<scalar_t>;
  auto* out = reinterpret_cast<typename E::storage*>(out_);
  at::parallel_for(0, rows * row_bytes, kBlock / 4, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end;) {  // q: a byte of the code, i.e. 4 neurons of row q / row_bytes
      const int64_t j = q % row_bytes, quads = std::min(end - q, row_bytes - j);
      code_spikes_row<E>(code + q, out + (q / row_bytes) * inner + 4 * j, std::min(4 * quads, inner - 4 * j));
      q += quads;
    }
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

// A meta tensor of this size and stride, after checking that they describe a dense layout (what the kernels read).
at::Tensor dense_layout(const char* op, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  TORCH_CHECK_VALUE(size.size() == stride.size(), op, ": stride ", stride, " does not match the size ", size);
  at::Tensor layout = at::empty_strided_symint(size, stride, at::TensorOptions().dtype(at::kByte).device(at::kMeta));
  TORCH_CHECK_VALUE(layout.is_non_overlapping_and_dense(), op, ": size ", size, " and stride ", stride,
                    " are not a dense layout");
  return layout;
}

// stride: the layout of the op's x (that of its spikes); grad_spikes may come in any layout.
void lif_backward_check(const at::Tensor& grad, const at::Tensor& code, c10::SymIntArrayRef stride, double decay,
                        double lens) {
  check_args("deepspike::lif_backward", grad, "grad_spikes", decay, std::nullopt, lens);
  TORCH_CHECK_TYPE(code.scalar_type() == at::kByte, "deepspike::lif_backward: code must be uint8, got ",
                   code.scalar_type());
  const auto expected = packed_shape(dense_layout("deepspike::lif_backward", grad.sym_sizes(), stride));
  TORCH_CHECK_VALUE(code.sym_sizes() == c10::SymIntArrayRef(expected), "deepspike::lif_backward: code has shape ",
                    code.sym_sizes(), ", the packed code of grad_spikes' shape and this stride has ",
                    c10::SymIntArrayRef(expected));
}

// The rows of a packed code as they lie in memory: code.size(-1) bytes each, over out's memory.
void lif_code_spikes_check(const at::Tensor& code, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                           at::ScalarType dtype) {
  constexpr const char* op = "deepspike::lif_code_spikes";
  TORCH_CHECK_TYPE(code.scalar_type() == at::kByte, op, ": code must be uint8, got ", code.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   op, ": dtype must be float64, float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(code.dim() >= 1 && code.is_contiguous(), op, ": code must be a contiguous packed code, got shape ",
                    code.sym_sizes());
  const c10::SymInt numel = dense_layout(op, size, stride).sym_numel(), row_bytes = code.sym_size(-1);
  const c10::SymInt rows = row_bytes != 0 ? code.sym_numel() / row_bytes : c10::SymInt(0);
  const c10::SymInt inner = rows != 0 ? numel / rows : c10::SymInt(0);
  TORCH_CHECK_VALUE(rows * inner == numel && (inner + 3) / 4 == row_bytes, op, ": code of shape ", code.sym_sizes(),
                    " is not the packed code of a tensor of size ", size);
}

// t itself where it is dense (any layout: no copy), else a copy in the layout empty_like chooses for it. The
// outputs are empty_like(the input the kernel reads), which is what the fake kernels return too.
at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : at::empty_like(t).copy_(t); }

std::tuple<at::Tensor, at::Tensor> lif_cpu(const at::Tensor& x_, double decay, double v_th, double lens) {
  lif_check(x_, decay, v_th, lens);
  const at::Tensor x = dense(x_);
  at::Tensor spikes = at::empty_like(x);
  const TimeLayout layout(x);
  at::Tensor code = at::empty({layout.outer, layout.T, layout.row_bytes}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "deepspike::lif", [&] {
    lif_forward_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), spikes.mutable_data_ptr<scalar_t>(),
                              code.mutable_data_ptr<uint8_t>(), layout, decay, v_th, lens);
  });
  return {spikes, code};
}

at::Tensor lif_backward_cpu_op(const at::Tensor& grad_, const at::Tensor& code_, at::IntArrayRef stride, double decay,
                               double lens) {
  lif_backward_check(grad_, code_, c10::fromIntArrayRefSlow(stride), decay, lens);
  const at::Tensor code = code_.contiguous();
  // The incoming gradient in x's layout (a copy only where autograd delivers another one).
  const at::Tensor grad = grad_.strides() == stride ? grad_ : at::empty_strided(grad_.sizes(), stride, grad_.options()).copy_(grad_);
  at::Tensor grad_x = at::empty_like(grad);
  const TimeLayout layout(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "deepspike::lif_backward", [&] {
    lif_backward_cpu<scalar_t>(grad.const_data_ptr<scalar_t>(), code.const_data_ptr<uint8_t>(),
                               grad_x.mutable_data_ptr<scalar_t>(), layout, decay, lens);
  });
  return grad_x;
}

at::Tensor lif_code_spikes_cpu(const at::Tensor& code, at::IntArrayRef size, at::IntArrayRef stride,
                               at::ScalarType dtype) {
  lif_code_spikes_check(code, c10::fromIntArrayRefSlow(size), c10::fromIntArrayRefSlow(stride), dtype);
  at::Tensor out = at::empty_strided(size, stride, code.options().dtype(dtype));
  const int64_t row_bytes = code.size(-1), rows = row_bytes ? code.numel() / row_bytes : 0;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "deepspike::lif_code_spikes", [&] {
    code_spikes_cpu<scalar_t>(code.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(), rows,
                              out.numel() / rows, row_bytes);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(deepspike, m) {
  m.def("lif(Tensor x, float decay, float v_th, float lens) -> (Tensor spikes, Tensor code)");
  m.def("lif_backward(Tensor grad_spikes, Tensor code, SymInt[] stride, float decay, float lens) -> Tensor");
  m.def("lif_code_spikes(Tensor code, SymInt[] size, SymInt[] stride, ScalarType dtype) -> Tensor");
  m.def("lif_check(Tensor x, float decay, float v_th, float lens) -> ()");
  m.def("lif_backward_check(Tensor grad_spikes, Tensor code, SymInt[] stride, float decay, float lens) -> ()");
  m.def("lif_code_spikes_check(Tensor code, SymInt[] size, SymInt[] stride, ScalarType dtype) -> ()");
}

TORCH_LIBRARY_IMPL(deepspike, CPU, m) {
  m.impl("lif", &lif_cpu);
  m.impl("lif_backward", &lif_backward_cpu_op);
  m.impl("lif_code_spikes", &lif_code_spikes_cpu);
}

// Above autograd and fake tensors: the checks read metadata only, on any device.
TORCH_LIBRARY_IMPL(deepspike, CompositeImplicitAutograd, m) {
  m.impl("lif_check", &lif_check);
  m.impl("lif_backward_check", &lif_backward_check);
  m.impl("lif_code_spikes_check", &lif_code_spikes_check);
}

}  // namespace deepspike
