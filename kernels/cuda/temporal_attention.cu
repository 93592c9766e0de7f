// com.motionrt.TemporalAttention (docs/operators.md): multi-head attention over the middle axis
// of [N, L, C] queries and [N, S, C] keys/values, C = heads * d, optional additive bias
// [1 or heads, L, S].
//
// One thread block per (sequence n, head h). The sequence's keys and values for the head are
// staged in shared memory as float32 (S * d * 2 floats; S is the frame count, at most a few
// dozen), then each warp takes query rows l = warp, warp + nwarps, ...: lane j holds elements
// j, j + 32, ... of the query row and of the output accumulator, a score is a warp-wide dot
// product (shuffle reduction), and the softmax is online (running maximum and sum), so the
// row is visited once. Accumulation in float32 for both the float32 and float16 entry points.
//
// No headers: float16 is handled as raw 16-bit values converted by the prelude
// (prelude.cuh, which kernels/src/cuda.rs prepends before NVRTC compiles this at run time).

// Elements per lane: d <= 32 * MAX_PER_LANE (d up to 256).
#define MAX_PER_LANE 8

template <typename T>
__device__ void temporal_attention(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const T* __restrict__ bias,
                                   T* __restrict__ y, int L, int S, int heads, int d,
                                   int bias_heads, float scale) {
    MRT_DYN_SMEM(float, smem);  // [S][d] keys then [S][d] values
    float* ks = smem;
    float* vs = smem + (long)S * d;
    const int n = blockIdx.x;
    const int h = blockIdx.y;
    const long C = (long)heads * d;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;

    for (int i = threadIdx.x; i < S * d; i += blockDim.x) {
        const int s = i / d, e = i % d;
        const long g = ((long)n * S + s) * C + (long)h * d + e;
        ks[i] = mrt_load(k, g);
        vs[i] = mrt_load(v, g);
    }
    __syncthreads();

    for (int l = warp; l < L; l += nwarps) {
        float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
        const long qo = ((long)n * L + l) * C + (long)h * d;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            qr[j] = e < d ? mrt_load(q, qo + e) * scale : 0.f;
            acc[j] = 0.f;
        }
        float m = __int_as_float(0xff800000), sum = 0.f;  // -inf
        const T* brow = 0;
        if (bias) brow = bias + ((long)(bias_heads == 1 ? 0 : h) * L + l) * S;
        for (int s = 0; s < S; ++s) {
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < MAX_PER_LANE; ++j) {
                const int e = lane + 32 * j;
                if (e < d) part += qr[j] * ks[s * d + e];
            }
            float sc = mrt_warp_sum(part);
            if (brow) sc += mrt_load(brow, s);
            if (sc > m) {
                const float r = __expf(m - sc);
                sum *= r;
#pragma unroll
                for (int j = 0; j < MAX_PER_LANE; ++j) acc[j] *= r;
                m = sc;
            }
            const float p = __expf(sc - m);
            sum += p;
#pragma unroll
            for (int j = 0; j < MAX_PER_LANE; ++j) {
                const int e = lane + 32 * j;
                if (e < d) acc[j] += p * vs[s * d + e];
            }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int j = 0; j < MAX_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < d) mrt_store(y, qo + e, acc[j] * inv);
        }
    }
}

// grid (N, heads), block 32 * nwarps threads, dynamic shared memory 2 * S * d * 4 bytes.
// bias may be null (bias_heads ignored then).
extern "C" __global__ void temporal_attention_f32(const float* q, const float* k, const float* v,
                                                  const float* bias, float* y, int L, int S,
                                                  int heads, int d, int bias_heads, float scale) {
    temporal_attention<float>(q, k, v, bias, y, L, S, heads, d, bias_heads, scale);
}

extern "C" __global__ void temporal_attention_f16(const half_bits* q, const half_bits* k,
                                                  const half_bits* v, const half_bits* bias,
                                                  half_bits* y, int L, int S, int heads, int d,
                                                  int bias_heads, float scale) {
    temporal_attention<half_bits>(q, k, v, bias, y, L, S, heads, d, bias_heads, scale);
}
