// com.motionrt.SparseCausalAttention (docs/operators.md): Tune-A-Video's sparse-causal attention
// over [B*F, S, C] tokens, C = heads * d. The queries of frame i attend to the keys/values of
// frame 0 followed by those of frame max(i - 1, 0): 2S keys (frame 0 sees its own keys twice,
// as the original concatenation does).
//
// Flash-style: one thread block per (frame bf, head h, tile of Q_TILE query rows). The 2S keys
// are visited in tiles of K_TILE rows staged in shared memory as float32; each warp owns query
// rows of the tile (lane j holds elements j, j + 32, ... of the query and of the accumulator),
// scores are warp-wide dot products, the softmax is online (running max and sum per row), so
// nothing of size S x 2S is ever materialised. float32 accumulation for float32 and float16.
//
// No headers: the conversions and reductions come from the prelude (prelude.cuh, which
// kernels/src/cuda.rs prepends before NVRTC compiles this at run time).

#define MAX_PER_LANE 8  // d <= 256
#define Q_TILE 32       // query rows per block
#define K_TILE 32       // key rows per shared-memory tile
#define ROWS_PER_WARP 4 // Q_TILE / (warps per block = 8)

template <typename T>
__device__ void sparse_causal_attention(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ y, int frames,
                                        int S, int heads, int d, float scale) {
    MRT_DYN_SMEM(float, smem);  // [K_TILE][d] keys then [K_TILE][d] values
    float* ks = smem;
    float* vs = smem + K_TILE * d;
    const int bf = blockIdx.x;
    const int h = blockIdx.y;
    const int row0 = blockIdx.z * Q_TILE;
    const int i = bf % frames;
    const int first = bf - i;                   // frame 0 of this video
    const int prev = first + (i > 0 ? i - 1 : 0);  // frame max(i - 1, 0)
    const long C = (long)heads * d;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;

    float qr[ROWS_PER_WARP][MAX_PER_LANE], acc[ROWS_PER_WARP][MAX_PER_LANE];
    float m[ROWS_PER_WARP], sum[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int t = row0 + warp * ROWS_PER_WARP + r;
        const long qo = ((long)bf * S + t) * C + (long)h * d;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            qr[r][j] = (t < S && e < d) ? mrt_load(q, qo + e) * scale : 0.f;
            acc[r][j] = 0.f;
        }
        m[r] = __int_as_float(0xff800000);  // -inf
        sum[r] = 0.f;
    }

    const int keys = 2 * S;
    for (int k0 = 0; k0 < keys; k0 += K_TILE) {
        const int kn = min(K_TILE, keys - k0);
        __syncthreads();
        for (int x = threadIdx.x; x < kn * d; x += blockDim.x) {
            const int u = k0 + x / d, e = x % d;
            const int f = u < S ? first : prev;
            const int s = u < S ? u : u - S;
            const long g = ((long)f * S + s) * C + (long)h * d + e;
            ks[x] = mrt_load(k, g);
            vs[x] = mrt_load(v, g);
        }
        __syncthreads();
        for (int u = 0; u < kn; ++u) {
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                float part = 0.f;
#pragma unroll
                for (int j = 0; j < MAX_PER_LANE; ++j) {
                    const int e = lane + 32 * j;
                    if (e < d) part += qr[r][j] * ks[u * d + e];
                }
                const float sc = mrt_warp_sum(part);
                if (sc > m[r]) {
                    const float c = __expf(m[r] - sc);
                    sum[r] *= c;
#pragma unroll
                    for (int j = 0; j < MAX_PER_LANE; ++j) acc[r][j] *= c;
                    m[r] = sc;
                }
                const float p = __expf(sc - m[r]);
                sum[r] += p;
#pragma unroll
                for (int j = 0; j < MAX_PER_LANE; ++j) {
                    const int e = lane + 32 * j;
                    if (e < d) acc[r][j] += p * vs[u * d + e];
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int t = row0 + warp * ROWS_PER_WARP + r;
        if (t >= S) continue;
        const long qo = ((long)bf * S + t) * C + (long)h * d;
        const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < d) mrt_store(y, qo + e, acc[r][j] * inv);
        }
    }
}

// grid (B*F, heads, ceil(S / Q_TILE)), block 256 threads (8 warps x ROWS_PER_WARP rows),
// dynamic shared memory 2 * K_TILE * d * 4 bytes.
extern "C" __global__ void sparse_causal_attention_f32(const float* q, const float* k,
                                                       const float* v, float* y, int frames,
                                                       int S, int heads, int d, float scale) {
    sparse_causal_attention<float>(q, k, v, y, frames, S, heads, d, scale);
}

extern "C" __global__ void sparse_causal_attention_f16(const half_bits* q, const half_bits* k,
                                                       const half_bits* v, half_bits* y,
                                                       int frames, int S, int heads, int d,
                                                       float scale) {
    sparse_causal_attention<half_bits>(q, k, v, y, frames, S, heads, d, scale);
}
