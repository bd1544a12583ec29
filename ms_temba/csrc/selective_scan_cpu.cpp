// The selective scan on CPU, forward and backward, as plain loops: the recurrence and everything
// elementwise around it (the step size softplus(delta + delta_bias), delta * u, the D skip and the
// silu(z) gate), so that no sequence-long temporary is allocated besides the outputs.
//
// Built on first use by ms_temba/ops (torch.utils.cpp_extension.load). Layouts:
//
//   u, delta, z, out and their gradients : (batch, dim, length), any strides (read and written
//                                          through `Strided`); outputs are allocated time-major,
//                                          with the strides of a transposed (batch, length, dim)
//   A                                    : (groups, N, H)       channel c = g * H + h, state n
//   B, C and their gradients             : (length, batch, groups, N), in the scan's time order
//
//   step[t] = softplus(delta[t] + delta_bias)                (or without softplus / bias)
//   h[t] = exp(step[t] A) h[t-1] + step[t] u[t] B[t]         y[t] = sum_n C[t, n] h[t, n]
//   out[t] = (y[t] + D u[t]) silu(z[t])
//
// With `reverse` the scan runs from the last time step to the first: scan step t reads and writes
// public time length - 1 - t, and B, C come already reversed (the caller's time-major copies).
//
// Work is split over blocks of kBlock adjacent channels of one (batch, group); a block's states
// (N x kBlock values) stay in registers or L1 for the whole sequence, and the innermost loops run
// over the block's channels, so they vectorise. The elementwise work of a step runs on small
// local arrays too: the block's values of u, delta, z (and grad_out) are copied in through their
// strides (`gather`) and the results copied out (`scatter`), so its loops over kBlock channels
// vectorise in any layout. In BiMamba's time-major layout each of those tensors moves a whole row
// (2-4 KB) per step, which the hardware prefetchers do not follow; `prefetch` asks for the lines
// kAhead steps early. Both together: forward 36-41 -> 22-26 ms, backward 95-109 -> 54-61 ms at
// dim 512, length 2500, 2 threads, on BiMamba's layout. The forward keeps the state at the start
// of every chunk of `chunk` steps; the backward recomputes a chunk's states, decays and outputs
// from it into small per-block buffers, then runs the reverse-time recurrence of the gradient
// through the chunk.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // channels per block: one AVX-512 register of floats

struct Layout {
  int64_t length, batch, groups, channels, states;  // channels = H per group
  int64_t blocks_per_group() const { return (channels + kBlock - 1) / kBlock; }
  // Offset of (t, b, g, n) in B or C.
  int64_t state(int64_t t, int64_t b, int64_t g, int64_t n) const {
    return ((t * batch + b) * groups + g) * states + n;
  }
  int64_t num_blocks() const { return batch * groups * blocks_per_group(); }
};

// A (batch, dim, length) tensor of any strides; data is null for an absent optional input.
template <typename scalar_t>
struct Strided {
  scalar_t* data = nullptr;
  int64_t batch_stride = 0, channel_stride = 0, time_stride = 0;
  Strided() = default;
  explicit Strided(const at::Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())), batch_stride(t.stride(0)), channel_stride(t.stride(1)),
        time_stride(t.stride(2)) {}
  scalar_t& at(int64_t b, int64_t c, int64_t t) const {
    return data[b * batch_stride + c * channel_stride + t * time_stride];
  }
};

// Where block `index` lies: batch b, group g, channels h0 .. h0 + width - 1 of the group, the
// first of them channel c0 = g * H + h0 of the public tensors.
struct Block {
  int64_t b, g, h0, c0, width;
  Block(const Layout& s, int64_t index) {
    const int64_t bg = index / s.blocks_per_group();
    b = bg / s.groups;
    g = bg % s.groups;
    h0 = (index % s.blocks_per_group()) * kBlock;
    c0 = g * s.channels + h0;
    width = std::min(kBlock, s.channels - h0);
  }
};

// values[i] = x[b, c0 + i, tp] for the block's channels, 0 past its width.
template <typename tensor_t, typename scalar_t>
void gather(const Strided<tensor_t>& x, const Block& block, int64_t tp, scalar_t* values) {
  std::fill(values, values + kBlock, scalar_t(0));
  for (int64_t i = 0; i < block.width; ++i) values[i] = x.at(block.b, block.c0 + i, tp);
}

// x[b, c0 + i, tp] = values[i] for the block's channels.
template <typename scalar_t>
void scatter(const Strided<scalar_t>& x, const Block& block, int64_t tp, const scalar_t* values) {
  for (int64_t i = 0; i < block.width; ++i) x.at(block.b, block.c0 + i, tp) = values[i];
}

// Asks for the cache line of the block's channels of x at public time tp, `kAhead` steps before
// it is read or written. A time-major x (BiMamba's transposed views) puts one step's 16 channels
// in one line and the next step's a row (2-4 KB) further, a stride that the hardware prefetchers,
// which stay within a 4 KB page, do not follow: every step then waited for memory.
template <typename tensor_t>
void prefetch(const Strided<tensor_t>& x, const Block& block, int64_t tp) {
  if (x.data) __builtin_prefetch(&x.at(block.b, block.c0, tp));
}

constexpr int64_t kAhead = 8;  // time steps

// The block's values of a per-channel vector (D, delta_bias), 0 past its width or when absent.
template <typename scalar_t>
void load_channels(const scalar_t* x, const Block& block, scalar_t* values) {
  std::fill(values, values + kBlock, scalar_t(0));
  if (x)
    for (int64_t i = 0; i < block.width; ++i) values[i] = x[block.c0 + i];
}

template <typename scalar_t>
scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

// The elementwise inputs of the scan and their options, shared by forward and backward.
template <typename scalar_t>
struct Inputs {
  Strided<const scalar_t> u, delta, z;  // z.data null: no gate
  const scalar_t* delta_bias;           // null: none
  const scalar_t* D;                    // null: no skip
  bool softplus, reverse;

  // Public time of scan step t.
  int64_t public_time(const Layout& s, int64_t t) const { return reverse ? s.length - 1 - t : t; }

  // The block's delta + delta_bias at public time tp, the argument of the softplus, given the
  // block's delta_bias (`load_channels`).
  void load_pre_step(const Block& block, const scalar_t* bias_block, int64_t tp,
                     scalar_t* pre_step) const {
    gather(delta, block, tp, pre_step);
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) pre_step[i] += bias_block[i];
  }

  // The block's step sizes, inputs and step * u at public time tp; all 0 past the block's width.
  void load_step(const Block& block, const scalar_t* bias_block, int64_t tp, scalar_t* step,
                 scalar_t* u_t, scalar_t* step_u) const {
    load_pre_step(block, bias_block, tp, step);
    gather(u, block, tp, u_t);
    if (softplus) {
#pragma omp simd
      for (int64_t i = 0; i < kBlock; ++i) {
        // torch's softplus: x above its threshold 20 is returned as is. softplus(0) is not 0:
        // the channels past the width are set back to 0.
        const scalar_t x = step[i];
        step[i] = i < block.width ? (x > scalar_t(20) ? x : std::log1p(std::exp(x))) : scalar_t(0);
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) step_u[i] = step[i] * u_t[i];
  }
};

// The block's columns of A (groups, N, H) as N rows of kBlock values.
template <typename scalar_t>
void load_A(const Layout& s, const Block& block, const scalar_t* A, scalar_t* A_block) {
  for (int64_t n = 0; n < s.states; ++n)
    for (int64_t i = 0; i < block.width; ++i)
      A_block[n * kBlock + i] = A[(block.g * s.states + n) * s.channels + block.h0 + i];
}

// One step of the recurrence for a block: next = exp(step A) prev + step_u B, y = sum_n C next.
// Writes the decays exp(step A) when `decay` is not null.
template <typename scalar_t>
void scan_step(const Layout& s, const scalar_t* step, const scalar_t* step_u,
               const scalar_t* A_block, const scalar_t* B_t, const scalar_t* C_t,
               const scalar_t* prev, scalar_t* next, scalar_t* decay, scalar_t* y) {
  for (int64_t i = 0; i < kBlock; ++i) y[i] = 0;
  for (int64_t n = 0; n < s.states; ++n) {
    const scalar_t* A_n = A_block + n * kBlock;
    const scalar_t* prev_n = prev + n * kBlock;
    scalar_t* next_n = next + n * kBlock;
    const scalar_t B_tn = B_t[n], C_tn = C_t[n];
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) {
      const scalar_t decay_i = std::exp(step[i] * A_n[i]);
      if (decay) decay[n * kBlock + i] = decay_i;
      next_n[i] = decay_i * prev_n[i] + step_u[i] * B_tn;
      y[i] += C_tn * next_n[i];
    }
  }
}

// Forward over all blocks. Writes out and the state entering each chunk followed by the last
// state (checkpoints, (num_chunks + 1, batch, groups, N, H)).
template <typename scalar_t>
void forward_kernel(const Layout& s, int64_t chunk, const Inputs<scalar_t>& in, const scalar_t* A,
                    const scalar_t* B, const scalar_t* C, Strided<scalar_t> out,
                    scalar_t* checkpoints) {
  const int64_t N = s.states, H = s.channels;
  at::parallel_for(0, s.num_blocks(), 1, [&](int64_t first, int64_t last) {
    // Two state buffers, swapped every step. Channels past a block's width stay zero (their A,
    // step and input are zero), so the inner loops can always run over kBlock channels.
    std::vector<scalar_t> h_store(2 * N * kBlock), A_store(N * kBlock);
    scalar_t* A_block = A_store.data();
    for (int64_t index = first; index < last; ++index) {
      const Block block(s, index);
      const int64_t b = block.b, g = block.g, h0 = block.h0, width = block.width;
      std::fill(A_store.begin(), A_store.end(), scalar_t(0));
      load_A(s, block, A, A_block);
      scalar_t D_block[kBlock], bias_block[kBlock];
      load_channels(in.D, block, D_block);
      load_channels(in.delta_bias, block, bias_block);
      std::fill(h_store.begin(), h_store.end(), scalar_t(0));
      scalar_t *h = h_store.data(), *h_next = h + N * kBlock;
      auto save_state = [&](int64_t row) {
        scalar_t* saved = checkpoints + ((row * s.batch + b) * s.groups + g) * N * H;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < width; ++i) saved[n * H + h0 + i] = h[n * kBlock + i];
      };
      for (int64_t t = 0; t < s.length; ++t) {
        if (t % chunk == 0) save_state(t / chunk);
        const int64_t tp = in.public_time(s, t);
        if (t + kAhead < s.length) {
          const int64_t ahead = in.public_time(s, t + kAhead);
          for (const auto* x : {&in.u, &in.delta, &in.z}) prefetch(*x, block, ahead);
          prefetch(out, block, ahead);
        }
        scalar_t step[kBlock], u_t[kBlock], step_u[kBlock], y[kBlock], value[kBlock];
        in.load_step(block, bias_block, tp, step, u_t, step_u);
        scan_step(s, step, step_u, A_block, B + s.state(t, b, g, 0), C + s.state(t, b, g, 0), h,
                  h_next, static_cast<scalar_t*>(nullptr), y);
        std::swap(h, h_next);
#pragma omp simd
        for (int64_t i = 0; i < kBlock; ++i) value[i] = y[i] + D_block[i] * u_t[i];
        if (in.z.data) {
          scalar_t z[kBlock];
          gather(in.z, block, tp, z);
#pragma omp simd
          for (int64_t i = 0; i < kBlock; ++i) value[i] *= z[i] * sigmoid(z[i]);
        }
        scatter(out, block, tp, value);
      }
      save_state((s.length + chunk - 1) / chunk);  // the last state, h[length - 1]
    }
  });
}

// The gradients written per (batch, channel, time) and the per-thread partial sums of those that
// several blocks share: grad_A over the batch, grad_B and grad_C over a group's channels, grad_D
// and grad_delta_bias over batch and time. Each thread adds into its own slice (threads, ...);
// the caller sums them.
template <typename scalar_t>
struct Gradients {
  Strided<scalar_t> u, delta, z;  // z.data null: no gate
  scalar_t *A_partial, *B_partial, *C_partial, *D_partial, *delta_bias_partial;
};

template <typename scalar_t>
void backward_kernel(const Layout& s, int64_t chunk, const Inputs<scalar_t>& in,
                     const scalar_t* A, const scalar_t* B, const scalar_t* C,
                     Strided<const scalar_t> grad_out, const scalar_t* checkpoints,
                     const Gradients<scalar_t>& grad) {
  const int64_t N = s.states, H = s.channels, dim = s.groups * H;
  const int64_t per_thread = s.length * s.batch * s.groups * N;
  const int64_t num_chunks = (s.length + chunk - 1) / chunk;
  at::parallel_for(0, s.num_blocks(), 1, [&](int64_t first, int64_t last) {
    const int64_t thread = at::get_thread_num();
    scalar_t* grad_B_mine = grad.B_partial + thread * per_thread;
    scalar_t* grad_C_mine = grad.C_partial + thread * per_thread;
    scalar_t* grad_A_mine = grad.A_partial + thread * s.groups * N * H;
    scalar_t* grad_D_mine = grad.D_partial + thread * dim;
    scalar_t* grad_bias_mine = grad.delta_bias_partial + thread * dim;
    // Per chunk step k: states[(k + 1) N kBlock ...] is h[t], row 0 the state entering the chunk;
    // decays, steps and y the recomputed exp(step A), step and y[t].
    std::vector<scalar_t> states((chunk + 1) * N * kBlock), decays(chunk * N * kBlock);
    std::vector<scalar_t> steps(chunk * kBlock), ys(chunk * kBlock);
    std::vector<scalar_t> A_store(N * kBlock), g_store(N * kBlock), grad_A_store(N * kBlock);
    scalar_t *A_block = A_store.data(), *grad_h = g_store.data(), *grad_A_block = grad_A_store.data();
    for (int64_t index = first; index < last; ++index) {
      const Block block(s, index);
      const int64_t b = block.b, g = block.g, h0 = block.h0, width = block.width;
      std::fill(A_store.begin(), A_store.end(), scalar_t(0));
      load_A(s, block, A, A_block);
      scalar_t D_block[kBlock], bias_block[kBlock];
      load_channels(in.D, block, D_block);
      load_channels(in.delta_bias, block, bias_block);
      std::fill(g_store.begin(), g_store.end(), scalar_t(0));  // nothing comes back after the end
      std::fill(grad_A_store.begin(), grad_A_store.end(), scalar_t(0));
      std::fill(states.begin(), states.end(), scalar_t(0));
      scalar_t grad_D_block[kBlock] = {}, grad_bias_block[kBlock] = {};
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t start = c * chunk, size = std::min(chunk, s.length - start);
        // Recompute the chunk's steps, decays, states and y from its checkpoint.
        const scalar_t* saved = checkpoints + ((c * s.batch + b) * s.groups + g) * N * H;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < width; ++i) states[n * kBlock + i] = saved[n * H + h0 + i];
        for (int64_t k = 0; k < size; ++k) {
          const int64_t t = start + k;
          scalar_t* step = steps.data() + k * kBlock;
          scalar_t u_t[kBlock], step_u[kBlock];
          if (t + kAhead < s.length) {
            const int64_t ahead = in.public_time(s, t + kAhead);
            prefetch(in.u, block, ahead);
            prefetch(in.delta, block, ahead);
          }
          in.load_step(block, bias_block, in.public_time(s, t), step, u_t, step_u);
          scan_step(s, step, step_u, A_block, B + s.state(t, b, g, 0), C + s.state(t, b, g, 0),
                    states.data() + k * N * kBlock, states.data() + (k + 1) * N * kBlock,
                    decays.data() + k * N * kBlock, ys.data() + k * kBlock);
        }
        // Reverse time. grad_h holds d loss / d h[t] once C[t] grad_y[t] is added, and
        // decay[t+1] d loss / d h[t+1] (what step t+1 sends back) before.
        for (int64_t k = size - 1; k >= 0; --k) {
          const int64_t t = start + k, tp = in.public_time(s, t);
          if (t >= kAhead) {
            const int64_t ahead = in.public_time(s, t - kAhead);
            for (const auto* x : {&in.u, &in.delta, &in.z}) prefetch(*x, block, ahead);
            prefetch(grad_out, block, ahead);
            for (const auto* x : {&grad.u, &grad.delta, &grad.z}) prefetch(*x, block, ahead);
          }
          const scalar_t* step = steps.data() + k * kBlock;
          const scalar_t* B_t = B + s.state(t, b, g, 0);
          const scalar_t* C_t = C + s.state(t, b, g, 0);
          scalar_t* grad_B_t = grad_B_mine + s.state(t, b, g, 0);
          scalar_t* grad_C_t = grad_C_mine + s.state(t, b, g, 0);
          // out = (y + D u) silu(z): d loss / d y, and the gate's gradient.
          scalar_t u_t[kBlock], step_u[kBlock], grad_y[kBlock];
          gather(in.u, block, tp, u_t);
          gather(grad_out, block, tp, grad_y);  // d loss / d out, the gate still to apply
#pragma omp simd
          for (int64_t i = 0; i < kBlock; ++i) step_u[i] = step[i] * u_t[i];
          if (in.z.data) {
            scalar_t z[kBlock], grad_z[kBlock];
            gather(in.z, block, tp, z);
            const scalar_t* y = ys.data() + k * kBlock;
#pragma omp simd
            for (int64_t i = 0; i < kBlock; ++i) {
              const scalar_t sigmoid_z = sigmoid(z[i]), pre_gate = y[i] + D_block[i] * u_t[i];
              // d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
              grad_z[i] = grad_y[i] * pre_gate * sigmoid_z *
                          (scalar_t(1) + z[i] * (scalar_t(1) - sigmoid_z));
              grad_y[i] *= z[i] * sigmoid_z;
            }
            scatter(grad.z, block, tp, grad_z);
          }
#pragma omp simd
          for (int64_t i = 0; i < kBlock; ++i) grad_D_block[i] += grad_y[i] * u_t[i];
          scalar_t grad_step[kBlock] = {}, grad_step_u[kBlock] = {};
          for (int64_t n = 0; n < N; ++n) {
            scalar_t* g_n = grad_h + n * kBlock;
            scalar_t* grad_A_n = grad_A_block + n * kBlock;
            const scalar_t* A_n = A_block + n * kBlock;
            const scalar_t* prev = states.data() + (k * N + n) * kBlock;
            const scalar_t* h_t = states.data() + ((k + 1) * N + n) * kBlock;
            const scalar_t* decay = decays.data() + (k * N + n) * kBlock;
            const scalar_t B_tn = B_t[n], C_tn = C_t[n];
            scalar_t grad_B_tn = 0, grad_C_tn = 0;
#pragma omp simd reduction(+ : grad_B_tn, grad_C_tn)
            for (int64_t i = 0; i < kBlock; ++i) {
              grad_C_tn += h_t[i] * grad_y[i];                   // y[t] = sum_n C h
              g_n[i] += C_tn * grad_y[i];                        // now d loss / d h[t]
              grad_step_u[i] += g_n[i] * B_tn;                   // h[t] = ... + step_u B
              grad_B_tn += g_n[i] * step_u[i];
              const scalar_t grad_log_decay = g_n[i] * decay[i] * prev[i];  // d / d (step A)
              grad_step[i] += grad_log_decay * A_n[i];
              grad_A_n[i] += grad_log_decay * step[i];
              g_n[i] *= decay[i];                                // sent back to h[t-1]
            }
            grad_B_t[n] += grad_B_tn;
            grad_C_t[n] += grad_C_tn;
          }
          // step u and the D skip, then the softplus (softplus' = sigmoid).
          scalar_t grad_u[kBlock], grad_delta[kBlock];
#pragma omp simd
          for (int64_t i = 0; i < kBlock; ++i) {
            grad_u[i] = grad_step_u[i] * step[i] + grad_y[i] * D_block[i];
            grad_delta[i] = grad_step[i] + grad_step_u[i] * u_t[i];
          }
          if (in.softplus) {
            scalar_t pre_step[kBlock];
            in.load_pre_step(block, bias_block, tp, pre_step);
#pragma omp simd
            for (int64_t i = 0; i < kBlock; ++i) grad_delta[i] *= sigmoid(pre_step[i]);
          }
#pragma omp simd
          for (int64_t i = 0; i < kBlock; ++i) grad_bias_block[i] += grad_delta[i];
          scatter(grad.u, block, tp, grad_u);
          scatter(grad.delta, block, tp, grad_delta);
        }
      }
      // The batch shares A, D and delta_bias, and blocks of one (g, h0) but another b may run
      // on another thread.
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* out = grad_A_mine + (g * N + n) * H + h0;
        for (int64_t i = 0; i < width; ++i) out[i] += grad_A_block[n * kBlock + i];
      }
      for (int64_t i = 0; i < width; ++i) {
        grad_D_mine[block.c0 + i] += grad_D_block[i];
        grad_bias_mine[block.c0 + i] += grad_bias_block[i];
      }
    }
  });
}

void check(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(),
                "selective_scan_cpu: tensors must share one dtype");
  }
}

void check_contiguous(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors)
    TORCH_CHECK(t.is_contiguous(), "selective_scan_cpu: A, B, C, D, delta_bias and the "
                                   "checkpoints must be contiguous");
}

// (batch, dim, length) storage that is time-major, the strides of a transposed (batch, length,
// dim), but a tensor of its own rather than a view: autograd adds a second gradient into a first
// one in place only when that is not a view (BiMamba's z gets one from each direction).
at::Tensor empty_time_major(const at::Tensor& like) {
  const int64_t dim = like.size(1), length = like.size(2);
  return at::empty_strided({like.size(0), dim, length}, {length * dim, 1, dim}, like.options());
}

// The caller's buffer for a (batch, dim, length) output like u (any strides; the caller reuses
// it across calls, see ms_temba/ops/workspace.py), or a new time-major one.
at::Tensor output_like(const std::optional<at::Tensor>& given, const at::Tensor& like) {
  if (!given) return empty_time_major(like);
  TORCH_CHECK(given->sizes() == like.sizes() && given->scalar_type() == like.scalar_type() &&
                  given->device() == like.device(),
              "selective_scan_cpu: an output buffer must have u's shape, dtype and device");
  return *given;
}

Layout layout_of(const at::Tensor& u, const at::Tensor& A) {
  // A is (groups, N, H).
  return Layout{u.size(2), u.size(0), A.size(0), A.size(2), A.size(1)};
}

std::vector<at::Tensor> optional_list(const std::optional<at::Tensor>& t) {
  return t ? std::vector<at::Tensor>{*t} : std::vector<at::Tensor>{};
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& u, const at::Tensor& delta,
                           const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& delta_bias,
                           const std::optional<at::Tensor>& D, bool softplus, bool reverse) {
  return Inputs<scalar_t>{Strided<const scalar_t>(u),
                          Strided<const scalar_t>(delta),
                          z ? Strided<const scalar_t>(*z) : Strided<const scalar_t>(),
                          delta_bias ? delta_bias->data_ptr<scalar_t>() : nullptr,
                          D ? D->data_ptr<scalar_t>() : nullptr,
                          softplus,
                          reverse};
}

// -> (out, checkpoints: the state entering each chunk, then the last state).
std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& delta,
                                const std::optional<at::Tensor>& z,
                                const std::optional<at::Tensor>& delta_bias,
                                const std::optional<at::Tensor>& D, const at::Tensor& A,
                                const at::Tensor& B, const at::Tensor& C, bool softplus,
                                bool reverse, int64_t chunk) {
  std::vector<at::Tensor> all{u, delta, A, B, C};
  for (const auto& t : {z, delta_bias, D})
    if (t) all.push_back(*t);
  check(all);
  check_contiguous({A, B, C});
  for (const auto& t : {delta_bias, D})
    if (t) check_contiguous({*t});
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk must be >= 1");
  const Layout s = layout_of(u, A);
  const int64_t num_chunks = (s.length + chunk - 1) / chunk;
  auto out = empty_time_major(u);
  auto checkpoints =
      at::empty({num_chunks + 1, s.batch, s.groups, s.states, s.channels}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    forward_kernel<scalar_t>(s, chunk,
                             inputs_of<scalar_t>(u, delta, z, delta_bias, D, softplus, reverse),
                             A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                             Strided<scalar_t>(out), checkpoints.data_ptr<scalar_t>());
  });
  return {out, checkpoints};
}

// -> (grad_u, grad_delta, grad_z or an empty tensor, grad_A, grad_B, grad_C, grad_D,
//     grad_delta_bias); grad_D and grad_delta_bias are computed whether or not D and
//     delta_bias were given. grad_u and grad_delta go into grad_u_out and grad_delta_out when
//     those are given (None from Python: new tensors). grad_delta_out may be delta itself: each
//     block reads its channels of delta at a time step (recomputing the chunk, then in reverse
//     time) before it writes grad_delta there, and never again after.
std::vector<at::Tensor> backward(const at::Tensor& u, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& delta_bias,
                                 const std::optional<at::Tensor>& D, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, bool softplus,
                                 bool reverse, const at::Tensor& grad_out,
                                 const at::Tensor& checkpoints, int64_t chunk,
                                 const std::optional<at::Tensor>& grad_u_out,
                                 const std::optional<at::Tensor>& grad_delta_out) {
  std::vector<at::Tensor> all{u, delta, A, B, C, grad_out, checkpoints};
  for (const auto& t : {z, delta_bias, D})
    if (t) all.push_back(*t);
  check(all);
  check_contiguous({A, B, C, checkpoints});
  for (const auto& t : {delta_bias, D})
    if (t) check_contiguous({*t});
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk must be >= 1");
  const Layout s = layout_of(u, A);
  const int64_t dim = u.size(1);
  auto grad_u = output_like(grad_u_out, u);
  auto grad_delta = output_like(grad_delta_out, u);
  auto grad_z = z ? empty_time_major(u) : at::Tensor();
  const int64_t threads = at::get_num_threads();
  auto grad_A_partial = at::zeros({threads, s.groups, s.states, s.channels}, u.options());
  auto grad_B_partial = at::zeros({threads, s.length, s.batch, s.groups, s.states}, u.options());
  auto grad_C_partial = at::zeros({threads, s.length, s.batch, s.groups, s.states}, u.options());
  auto grad_D_partial = at::zeros({threads, dim}, u.options());
  auto grad_bias_partial = at::zeros({threads, dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    Gradients<scalar_t> grad{Strided<scalar_t>(grad_u),
                             Strided<scalar_t>(grad_delta),
                             z ? Strided<scalar_t>(grad_z) : Strided<scalar_t>(),
                             grad_A_partial.data_ptr<scalar_t>(),
                             grad_B_partial.data_ptr<scalar_t>(),
                             grad_C_partial.data_ptr<scalar_t>(),
                             grad_D_partial.data_ptr<scalar_t>(),
                             grad_bias_partial.data_ptr<scalar_t>()};
    backward_kernel<scalar_t>(s, chunk,
                              inputs_of<scalar_t>(u, delta, z, delta_bias, D, softplus, reverse),
                              A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                              C.data_ptr<scalar_t>(), Strided<const scalar_t>(grad_out),
                              checkpoints.data_ptr<scalar_t>(), grad);
  });
  return {grad_u, grad_delta, grad_z, grad_A_partial.sum(0), grad_B_partial.sum(0),
          grad_C_partial.sum(0), grad_D_partial.sum(0), grad_bias_partial.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward: (out, states entering each chunk + last state)");
  m.def("backward", &backward,
        "selective scan backward: (grad_u, grad_delta, grad_z, grad_A, grad_B, grad_C, grad_D, "
        "grad_delta_bias)");
}
