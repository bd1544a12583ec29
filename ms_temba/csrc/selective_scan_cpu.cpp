// The selective scan's sequential recurrence on CPU, forward and backward, as plain loops.
//
// Built on first use by ms_temba/ops.py (torch.utils.cpp_extension.load); ops.py prepares every
// input in the time-major layouts below and does everything that is elementwise over whole
// sequences (softplus, delta * u, the D skip, the silu gate) with ordinary torch ops.
//
//   step, step_u, grad_y : (length, batch, groups, H)   the step size delta, delta * u, d loss/d y
//   A                    : (groups, N, H)               channel c = g * H + h, state n
//   B, C                 : (length, batch, groups, N)
//
//   h[t] = exp(step[t] A) h[t-1] + step_u[t] B[t]        y[t] = sum_n C[t, n] h[t, n]
//
// Work is split over blocks of kBlock adjacent channels of one (batch, group); a block's states
// (N x kBlock values) stay in registers or L1 for the whole sequence, and the innermost loops run
// over the block's channels, which are contiguous in every per-channel tensor, so they vectorise.
// The forward keeps the state at the start of every chunk of `chunk` steps; the backward recomputes
// a chunk's states and decays from it into a small per-block buffer, then runs the reverse-time
// recurrence of the gradient through the chunk.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // channels per block: one AVX-512 register of floats

struct Layout {
  int64_t length, batch, groups, channels, states;  // channels = H per group
  int64_t blocks_per_group() const { return (channels + kBlock - 1) / kBlock; }
  // Offset of (t, b, g, h) in a per-channel tensor and of (t, b, g, n) in B or C.
  int64_t channel(int64_t t, int64_t b, int64_t g, int64_t h) const {
    return ((t * batch + b) * groups + g) * channels + h;
  }
  int64_t state(int64_t t, int64_t b, int64_t g, int64_t n) const {
    return ((t * batch + b) * groups + g) * states + n;
  }
  int64_t num_blocks() const { return batch * groups * blocks_per_group(); }
};

// Where block `index` lies: batch b, group g, channels h0 .. h0 + width - 1 of the group.
struct Block {
  int64_t b, g, h0, width;
  Block(const Layout& s, int64_t index) {
    const int64_t bg = index / s.blocks_per_group();
    b = bg / s.groups;
    g = bg % s.groups;
    h0 = (index % s.blocks_per_group()) * kBlock;
    width = std::min(kBlock, s.channels - h0);
  }
};

// The block's columns of A (groups, N, H) as N rows of kBlock values.
template <typename scalar_t>
void load_A(const Layout& s, const Block& block, const scalar_t* A, scalar_t* A_block) {
  for (int64_t n = 0; n < s.states; ++n)
    for (int64_t i = 0; i < block.width; ++i)
      A_block[n * kBlock + i] = A[(block.g * s.states + n) * s.channels + block.h0 + i];
}

Layout layout_of(const at::Tensor& step, const at::Tensor& A) {
  return Layout{step.size(0), step.size(1), step.size(2), step.size(3), A.size(1)};
}

void check(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "selective_scan_cpu: tensors must be contiguous");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(),
                "selective_scan_cpu: tensors must share one dtype");
  }
}

// Forward over all blocks. Writes y and the state entering each chunk followed by the last state
// (checkpoints, (num_chunks + 1, batch, groups, N, H)).
template <typename scalar_t>
void forward_kernel(const Layout& s, int64_t chunk, const scalar_t* step, const scalar_t* step_u,
                    const scalar_t* A, const scalar_t* B, const scalar_t* C, scalar_t* y,
                    scalar_t* checkpoints) {
  const int64_t N = s.states, H = s.channels;
  at::parallel_for(0, s.num_blocks(), 1, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> h_store(N * kBlock), A_store(N * kBlock);
    scalar_t* h = h_store.data();
    scalar_t* A_block = A_store.data();
    for (int64_t index = first; index < last; ++index) {
      const Block block(s, index);
      const int64_t b = block.b, g = block.g, h0 = block.h0, width = block.width;
      load_A(s, block, A, A_block);
      std::fill(h_store.begin(), h_store.end(), scalar_t(0));
      auto save_state = [&](int64_t row) {
        scalar_t* saved = checkpoints + ((row * s.batch + b) * s.groups + g) * N * H;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < width; ++i) saved[n * H + h0 + i] = h[n * kBlock + i];
      };
      for (int64_t t = 0; t < s.length; ++t) {
        if (t % chunk == 0) save_state(t / chunk);
        const scalar_t* step_t = step + s.channel(t, b, g, h0);
        const scalar_t* step_u_t = step_u + s.channel(t, b, g, h0);
        const scalar_t* B_t = B + s.state(t, b, g, 0);
        const scalar_t* C_t = C + s.state(t, b, g, 0);
        scalar_t y_t[kBlock] = {};
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* h_n = h + n * kBlock;
          const scalar_t* A_n = A_block + n * kBlock;
          const scalar_t B_tn = B_t[n], C_tn = C_t[n];
#pragma omp simd
          for (int64_t i = 0; i < width; ++i) {
            h_n[i] = std::exp(step_t[i] * A_n[i]) * h_n[i] + step_u_t[i] * B_tn;
            y_t[i] += C_tn * h_n[i];
          }
        }
        scalar_t* y_out = y + s.channel(t, b, g, h0);
        for (int64_t i = 0; i < width; ++i) y_out[i] = y_t[i];
      }
      save_state((s.length + chunk - 1) / chunk);  // the last state, h[length - 1]
    }
  });
}

// Backward over all blocks. grad_B and grad_C are sums over the channels of a group and grad_A a
// sum over the batch, which several threads share, so each thread adds into its own slice of
// *_partial (threads, ...); the caller sums them.
template <typename scalar_t>
void backward_kernel(const Layout& s, int64_t chunk, const scalar_t* step, const scalar_t* step_u,
                     const scalar_t* A, const scalar_t* B, const scalar_t* C,
                     const scalar_t* grad_y, const scalar_t* checkpoints, scalar_t* y,
                     scalar_t* grad_step, scalar_t* grad_step_u, scalar_t* grad_A_partial,
                     scalar_t* grad_B_partial, scalar_t* grad_C_partial) {
  const int64_t N = s.states, H = s.channels;
  const int64_t per_thread = s.length * s.batch * s.groups * N;
  const int64_t num_chunks = (s.length + chunk - 1) / chunk;
  at::parallel_for(0, s.num_blocks(), 1, [&](int64_t first, int64_t last) {
    scalar_t* grad_B_mine = grad_B_partial + at::get_thread_num() * per_thread;
    scalar_t* grad_C_mine = grad_C_partial + at::get_thread_num() * per_thread;
    scalar_t* grad_A_mine = grad_A_partial + at::get_thread_num() * s.groups * N * H;
    // states[(t + 1) N kBlock ...] is h[t] of the chunk, row 0 the state entering it.
    std::vector<scalar_t> states((chunk + 1) * N * kBlock), decays(chunk * N * kBlock);
    std::vector<scalar_t> A_store(N * kBlock), g_store(N * kBlock), grad_A_store(N * kBlock);
    scalar_t *A_block = A_store.data(), *grad_h = g_store.data(), *grad_A_block = grad_A_store.data();
    for (int64_t index = first; index < last; ++index) {
      const Block block(s, index);
      const int64_t b = block.b, g = block.g, h0 = block.h0, width = block.width;
      load_A(s, block, A, A_block);
      std::fill(g_store.begin(), g_store.end(), scalar_t(0));  // nothing comes back after the end
      std::fill(grad_A_store.begin(), grad_A_store.end(), scalar_t(0));
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t start = c * chunk, size = std::min(chunk, s.length - start);
        // Recompute the chunk's decays, states and outputs y from its checkpoint (y is returned
        // so that the caller need not keep the forward's y for the gate's gradient).
        const scalar_t* saved = checkpoints + ((c * s.batch + b) * s.groups + g) * N * H;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < width; ++i) states[n * kBlock + i] = saved[n * H + h0 + i];
        for (int64_t k = 0; k < size; ++k) {
          const int64_t t = start + k;
          const scalar_t* step_t = step + s.channel(t, b, g, h0);
          const scalar_t* step_u_t = step_u + s.channel(t, b, g, h0);
          const scalar_t* B_t = B + s.state(t, b, g, 0);
          const scalar_t* C_t = C + s.state(t, b, g, 0);
          scalar_t y_t[kBlock] = {};
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* A_n = A_block + n * kBlock;
            const scalar_t* prev = states.data() + (k * N + n) * kBlock;
            scalar_t* next = states.data() + ((k + 1) * N + n) * kBlock;
            scalar_t* decay = decays.data() + (k * N + n) * kBlock;
            const scalar_t B_tn = B_t[n], C_tn = C_t[n];
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) {
              decay[i] = std::exp(step_t[i] * A_n[i]);
              next[i] = decay[i] * prev[i] + step_u_t[i] * B_tn;
              y_t[i] += C_tn * next[i];
            }
          }
          scalar_t* y_out = y + s.channel(t, b, g, h0);
          for (int64_t i = 0; i < width; ++i) y_out[i] = y_t[i];
        }
        // Reverse time. grad_h holds d loss / d h[t] once C[t] grad_y[t] is added, and
        // decay[t+1] d loss / d h[t+1] (what step t+1 sends back) before.
        for (int64_t k = size - 1; k >= 0; --k) {
          const int64_t t = start + k;
          const scalar_t* step_t = step + s.channel(t, b, g, h0);
          const scalar_t* step_u_t = step_u + s.channel(t, b, g, h0);
          const scalar_t* grad_y_t = grad_y + s.channel(t, b, g, h0);
          const scalar_t* B_t = B + s.state(t, b, g, 0);
          const scalar_t* C_t = C + s.state(t, b, g, 0);
          scalar_t* grad_B_t = grad_B_mine + s.state(t, b, g, 0);
          scalar_t* grad_C_t = grad_C_mine + s.state(t, b, g, 0);
          scalar_t grad_step_t[kBlock] = {}, grad_step_u_t[kBlock] = {};
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
            for (int64_t i = 0; i < width; ++i) {
              grad_C_tn += h_t[i] * grad_y_t[i];                 // y[t] = sum_n C h
              g_n[i] += C_tn * grad_y_t[i];                      // now d loss / d h[t]
              grad_step_u_t[i] += g_n[i] * B_tn;                 // h[t] = ... + step_u B
              grad_B_tn += g_n[i] * step_u_t[i];
              const scalar_t grad_log_decay = g_n[i] * decay[i] * prev[i];  // d / d (step A)
              grad_step_t[i] += grad_log_decay * A_n[i];
              grad_A_n[i] += grad_log_decay * step_t[i];
              g_n[i] *= decay[i];                                // sent back to h[t-1]
            }
            grad_B_t[n] += grad_B_tn;
            grad_C_t[n] += grad_C_tn;
          }
          scalar_t* grad_step_out = grad_step + s.channel(t, b, g, h0);
          scalar_t* grad_step_u_out = grad_step_u + s.channel(t, b, g, h0);
          for (int64_t i = 0; i < width; ++i) {
            grad_step_out[i] = grad_step_t[i];
            grad_step_u_out[i] = grad_step_u_t[i];
          }
        }
      }
      // The batch shares A, and blocks of one (g, h0) but another b may run on another thread.
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* out = grad_A_mine + (g * N + n) * H + h0;
        for (int64_t i = 0; i < width; ++i) out[i] += grad_A_block[n * kBlock + i];
      }
    }
  });
}

std::vector<at::Tensor> forward(const at::Tensor& step, const at::Tensor& step_u,
                                const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                int64_t chunk) {
  check({step, step_u, A, B, C});
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk must be >= 1");
  const Layout s = layout_of(step, A);
  const int64_t num_chunks = (s.length + chunk - 1) / chunk;
  auto y = at::empty_like(step);
  auto checkpoints =
      at::empty({num_chunks + 1, s.batch, s.groups, s.states, s.channels}, step.options());
  AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "selective_scan_cpu_forward", [&] {
    forward_kernel<scalar_t>(s, chunk, step.data_ptr<scalar_t>(), step_u.data_ptr<scalar_t>(),
                             A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), checkpoints.data_ptr<scalar_t>());
  });
  return {y, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& step, const at::Tensor& step_u,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const at::Tensor& grad_y, const at::Tensor& checkpoints,
                                 int64_t chunk) {
  check({step, step_u, A, B, C, grad_y, checkpoints});
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk must be >= 1");
  const Layout s = layout_of(step, A);
  auto y = at::empty_like(step);
  auto grad_step = at::empty_like(step);
  auto grad_step_u = at::empty_like(step);
  const int64_t threads = at::get_num_threads();
  auto grad_A_partial = at::zeros({threads, s.groups, s.states, s.channels}, step.options());
  auto grad_B_partial = at::zeros({threads, s.length, s.batch, s.groups, s.states}, step.options());
  auto grad_C_partial = at::zeros({threads, s.length, s.batch, s.groups, s.states}, step.options());
  AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "selective_scan_cpu_backward", [&] {
    backward_kernel<scalar_t>(
        s, chunk, step.data_ptr<scalar_t>(), step_u.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(),
        checkpoints.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), grad_step.data_ptr<scalar_t>(),
        grad_step_u.data_ptr<scalar_t>(), grad_A_partial.data_ptr<scalar_t>(),
        grad_B_partial.data_ptr<scalar_t>(), grad_C_partial.data_ptr<scalar_t>());
  });
  return {y, grad_step, grad_step_u, grad_A_partial.sum(0), grad_B_partial.sum(0),
          grad_C_partial.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward: (y, states entering each chunk + last state)");
  m.def("backward", &backward,
        "selective scan backward: (y, grad_step, grad_step_u, grad_A, grad_B, grad_C)");
}
