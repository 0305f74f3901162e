// What reading a layer's w4a16 bytes costs, with nothing else: no decode, no dot, no K sum (see
// read_floor.py). The layout is tile-major: per 32-column tile, n_sc superchunks of 2 KB of codes,
// and per tile n_sc x 256 B of scales. Block (tile, r) reads superchunks [r * PER, (r + 1) * PER) of
// its tile, folds the bytes into one number per column and stores it, so no load can be skipped.
//   ldg:   128 threads, every 16-byte load of the block issued before the first is used.
//   bulk:  one thread copies the block's codes and scales into shared memory with two TMA bulk
//          copies (cp.async.bulk, sm_90) completing one mbarrier; 128 threads fold from there.
//   empty: the same grid, no loads (the launch alone).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

namespace {

__device__ __forceinline__ unsigned shared_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void store_fold(unsigned x, float* out, int n) {
  __shared__ unsigned fold[32];
  if (threadIdx.x < 32) fold[threadIdx.x] = 0;
  __syncthreads();
  atomicXor(&fold[threadIdx.x & 31], x);
  __syncthreads();
  if (threadIdx.x < 32) out[blockIdx.y * n + blockIdx.x * 32 + threadIdx.x] = (float)(fold[threadIdx.x] & 0xFFFF);
}

template <int PER>
__global__ void __launch_bounds__(128) read_ldg(const int4* __restrict__ w, const int4* __restrict__ s, float* out,
                                                int n_sc, int n) {
  constexpr int SCALE_LOADS = (PER * 16 + 127) / 128;
  const size_t first = (size_t)blockIdx.x * n_sc + blockIdx.y * PER;  // first superchunk of the block
  const int4* wt = w + first * 128;
  const int4* st = s + first * 16;
  int4 v[PER], sv[SCALE_LOADS];
#pragma unroll
  for (int j = 0; j < PER; ++j) v[j] = wt[j * 128 + threadIdx.x];
#pragma unroll
  for (int j = 0; j < SCALE_LOADS; ++j)
    if (j * 128 + threadIdx.x < PER * 16) sv[j] = st[j * 128 + threadIdx.x];
  unsigned x = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) x ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
#pragma unroll
  for (int j = 0; j < SCALE_LOADS; ++j)
    if (j * 128 + threadIdx.x < PER * 16) x ^= sv[j].x ^ sv[j].y ^ sv[j].z ^ sv[j].w;
  store_fold(x, out, n);
}

template <int PER>
__global__ void __launch_bounds__(128) read_bulk(const int4* __restrict__ w, const int4* __restrict__ s, float* out,
                                                 int n_sc, int n) {
  extern __shared__ __align__(128) int4 buf[];
  __shared__ __align__(8) unsigned long long arrived;
  const size_t first = (size_t)blockIdx.x * n_sc + blockIdx.y * PER;
  const unsigned code_bytes = PER * 2048, scale_bytes = PER * 256;
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_addr(&arrived)));
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"(shared_addr(&arrived)), "r"(code_bytes + scale_bytes));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(shared_addr(buf)), "l"(w + first * 128), "r"(code_bytes), "r"(shared_addr(&arrived)) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(shared_addr(buf + PER * 128)), "l"(s + first * 16), "r"(scale_bytes), "r"(shared_addr(&arrived))
                 : "memory");
  }
  unsigned done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(shared_addr(&arrived)) : "memory");
  unsigned x = 0;
  for (int j = threadIdx.x; j < PER * 144; j += 128) { int4 v = buf[j]; x ^= v.x ^ v.y ^ v.z ^ v.w; }
  store_fold(x, out, n);
}

__global__ void launch_only(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0x7fffffff) out[0] = 1.f;  // never true: an empty body
}

template <int PER>
void launch(int64_t mode, const int4* w, const int4* s, float* out, int n_sc, int n, cudaStream_t stream) {
  dim3 grid(n / 32, n_sc / PER);
  if (mode == 0) {
    read_ldg<PER><<<grid, 128, 0, stream>>>(w, s, out, n_sc, n);
  } else if (mode == 1) {
    const int smem = PER * 144 * 16;
    cudaFuncSetAttribute(read_bulk<PER>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    read_bulk<PER><<<grid, 128, smem, stream>>>(w, s, out, n_sc, n);
  } else {
    launch_only<<<grid, 128, 0, stream>>>(out);
  }
}

}  // namespace

// mode 0 ldg, 1 bulk, 2 empty; per: superchunks a block (divides n_sc); out: [n_sc / per, n] fp32
void read_floor(torch::Tensor w, torch::Tensor s, torch::Tensor out, int64_t mode, int64_t per) {
  const int n = out.size(1), n_sc = (int)(w.numel() / (n / 32) / 2048);
  TORCH_CHECK(n % 32 == 0 && n_sc % per == 0 && out.size(0) == n_sc / per, "read_floor: bad shapes");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto wp = (const int4*)w.data_ptr();
  auto sp = (const int4*)s.data_ptr();
  float* o = out.data_ptr<float>();
  switch (per) {
    case 24: launch<24>(mode, wp, sp, o, n_sc, n, stream); break;
    case 12: launch<12>(mode, wp, sp, o, n_sc, n, stream); break;
    case 8: launch<8>(mode, wp, sp, o, n_sc, n, stream); break;
    case 6: launch<6>(mode, wp, sp, o, n_sc, n, stream); break;
    case 4: launch<4>(mode, wp, sp, o, n_sc, n, stream); break;
    case 3: launch<3>(mode, wp, sp, o, n_sc, n, stream); break;
    case 2: launch<2>(mode, wp, sp, o, n_sc, n, stream); break;
    case 1: launch<1>(mode, wp, sp, o, n_sc, n, stream); break;
    default: TORCH_CHECK(false, "read_floor: per must be 1, 2, 3, 4, 6, 8, 12 or 24");
  }
}
