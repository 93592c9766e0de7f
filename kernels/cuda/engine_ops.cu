// The native CUDA engine's kernels (runtime/src/engine/exec.rs): everything a fused motionrt graph
// needs besides the GEMMs (cuBLAS) and convolutions (cuDNN). Each kernel exists for float32
// (`_f32`) and float16 (`_f16`, raw 16-bit values converted by the prelude); arithmetic and every
// reduction are float32. The fused attention for long sequences (`flash_attention_f16_dDP`) uses
// the tensor cores through `mma.sync.m16n8k16` with float32 accumulation.
//
// No headers: conversions, warp reductions and the tensor-core instruction come from the prelude
// (prelude.cuh, which kernels/src/cuda.rs prepends before NVRTC compiles this at run time).

typedef long long i64;

#define MAX_RANK 6
// A strided iteration over `dims` (row-major, innermost last); element (i0..ir) reads
// in[in_off + sum ik * in_strides[k]] and writes out[out_off + sum ik * out_strides[k]].
struct Strided {
    int rank;
    int pad_;
    i64 dims[MAX_RANK];
    i64 a[MAX_RANK];
    i64 b[MAX_RANK];
    i64 c[MAX_RANK];
};

__device__ __forceinline__ void offsets(const Strided& s, i64 i, i64* oa, i64* ob, i64* oc) {
    i64 a = 0, b = 0, c = 0;
    for (int k = s.rank - 1; k >= 0; --k) {
        const i64 d = s.dims[k];
        const i64 ik = i % d;
        i /= d;
        a += ik * s.a[k];
        b += ik * s.b[k];
        c += ik * s.c[k];
    }
    *oa = a;
    *ob = b;
    *oc = c;
}

#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// out[c-offset] = in[a-offset]: Transpose, Slice, Expand, Concat (one launch per input), nearest
// Resize by integer factors (split dims with stride 0).
template <typename T>
__device__ void copy_strided(T* out, const T* in, i64 n, Strided s, i64 in_off, i64 out_off) {
    GRID_LOOP(i, n) {
        i64 a, b, c;
        offsets(s, i, &a, &b, &c);
        out[out_off + c] = in[in_off + a];
    }
}

__device__ __forceinline__ float binop(int op, float x, float y) {
    switch (op) {
        case 0: return x + y;
        case 1: return x - y;
        case 2: return x * y;
        default: return x / y;
    }
}

// out (contiguous, dims of s) = a op b with broadcasting strides s.a, s.b.
template <typename T>
__device__ void binary(T* out, const T* x, const T* y, i64 n, int op, Strided s) {
    GRID_LOOP(i, n) {
        i64 a, b, c;
        offsets(s, i, &a, &b, &c);
        mrt_store(out, i, binop(op, mrt_load(x, a), mrt_load(y, b)));
    }
}

template <typename T>
__device__ void binary_same(T* out, const T* x, const T* y, i64 n, int op) {
    GRID_LOOP(i, n) mrt_store(out, i, binop(op, mrt_load(x, i), mrt_load(y, i)));
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__device__ void unary(T* out, const T* x, i64 n, int op) {
    GRID_LOOP(i, n) {
        const float v = mrt_load(x, i);
        float r;
        switch (op) {
            case 0: r = sigmoidf(v); break;
            case 1: r = sinf(v); break;
            case 2: r = cosf(v); break;
            case 3: r = v * sigmoidf(v); break;
            default: r = -v; break;
        }
        mrt_store(out, i, r);
    }
}

// y[r, c] += bias[c] + res[r, c]   (bias, res may be null)
template <typename T>
__device__ void bias_residual(T* y, const T* bias, const T* res, i64 rows, i64 cols) {
    GRID_LOOP(i, rows * cols) {
        float v = mrt_load(y, i);
        if (bias) v += mrt_load(bias, i % cols);
        if (res) v += mrt_load(res, i);
        mrt_store(y, i, v);
    }
}

// y[n, c, s] += bias[c] + res[n, c, s]   (after a convolution; res may be null)
template <typename T>
__device__ void channel_bias(T* y, const T* bias, const T* res, i64 total, i64 channels,
                             i64 spatial) {
    GRID_LOOP(i, total) {
        float v = mrt_load(y, i);
        if (bias) v += mrt_load(bias, (i / spatial) % channels);
        if (res) v += mrt_load(res, i);
        mrt_store(y, i, v);
    }
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = mrt_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.f;
    return mrt_warp_sum(t);
}
__device__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = mrt_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : __int_as_float(0xff800000);
    return mrt_warp_max(t);
}

// GroupNorm over [N, C, spatial]: one block per (n, group); two passes for the statistics
// (mean, then the centred sum of squares), then the affine and optional SiLU.
template <typename T>
__device__ void group_norm(T* y, const T* x, const T* gamma, const T* beta, int C, i64 spatial,
                           int groups, float eps, int silu) {
    __shared__ float scratch[32];
    const int n = blockIdx.x / groups, g = blockIdx.x % groups;
    const int cg = C / groups;
    const i64 count = (i64)cg * spatial;
    const i64 base = ((i64)n * C + (i64)g * cg) * spatial;
    float s = 0.f;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) s += mrt_load(x, base + i);
    const float mean = block_sum(s, scratch) / (float)count;
    float q = 0.f;
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) {
        const float d = mrt_load(x, base + i) - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / (float)count + eps);
    for (i64 i = threadIdx.x; i < count; i += blockDim.x) {
        const int c = g * cg + (int)(i / spatial);
        float v = (mrt_load(x, base + i) - mean) * rstd * mrt_load(gamma, c) + mrt_load(beta, c);
        if (silu) v = v * sigmoidf(v);
        mrt_store(y, base + i, v);
    }
}

// LayerNormalization over the last axis (cols): one block per row.
template <typename T>
__device__ void layer_norm(T* y, const T* x, const T* gamma, const T* beta, int cols,
                           float eps) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * cols;
    float s = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += mrt_load(x, base + i);
    const float mean = block_sum(s, scratch) / (float)cols;
    float q = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float d = mrt_load(x, base + i) - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = (mrt_load(x, base + i) - mean) * rstd * mrt_load(gamma, i);
        if (beta) v += mrt_load(beta, i);
        mrt_store(y, base + i, v);
    }
}

// Softmax over the last axis: one block per row.
template <typename T>
__device__ void softmax(T* y, const T* x, int cols) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * cols;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, mrt_load(x, base + i));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += __expf(mrt_load(x, base + i) - m);
    const float inv = 1.f / block_sum(s, scratch);
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        mrt_store(y, base + i, __expf(mrt_load(x, base + i) - m) * inv);
}

// y[r, j] = x[r, j] * gelu(x[r, d + j]) (exact erf GELU)
template <typename T>
__device__ void geglu(T* y, const T* x, i64 rows, i64 d) {
    GRID_LOOP(i, rows * d) {
        const i64 r = i / d, j = i % d;
        const float a = mrt_load(x, r * 2 * d + j);
        const float g = mrt_load(x, r * 2 * d + d + j);
        mrt_store(y, i, a * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
}

// out[i, :] = table[ids[i], :] (ids out of range give an all-NaN row: the runtime checks ids)
template <typename T>
__device__ void gather_rows(T* out, const T* table, const i64* ids, i64 n_ids, i64 row,
                            i64 n_rows) {
    GRID_LOOP(i, n_ids * row) {
        const i64 r = i / row, j = i % row;
        const i64 id = ids[r];
        const bool ok = id >= 0 && id < n_rows;
        mrt_store(out, i, ok ? mrt_load(table, id * row + j) : __int_as_float(0x7fc00000));
    }
}

template <typename T>
__device__ void cast_from_f32(T* out, const float* in, i64 n) {
    GRID_LOOP(i, n) mrt_store(out, i, in[i]);
}
template <typename T>
__device__ void cast_to_f32(float* out, const T* in, i64 n) {
    GRID_LOOP(i, n) out[i] = mrt_load(in, i);
}
template <typename T>
__device__ void fill(T* out, i64 n, float v) {
    GRID_LOOP(i, n) mrt_store(out, i, v);
}

#define ENTRY(NAME, T, SUF, PARAMS, ARGS) \
    extern "C" __global__ void NAME##_##SUF PARAMS { NAME<T> ARGS; }
#define BOTH(NAME, PARAMS_F, PARAMS_H, ARGS) \
    ENTRY(NAME, float, f32, PARAMS_F, ARGS)  \
    ENTRY(NAME, half_bits, f16, PARAMS_H, ARGS)

#define P_COPY(T) (T* out, const T* in, i64 n, Strided s, i64 in_off, i64 out_off)
BOTH(copy_strided, P_COPY(float), P_COPY(half_bits), (out, in, n, s, in_off, out_off))
#define P_BIN(T) (T* out, const T* x, const T* y, i64 n, int op, Strided s)
BOTH(binary, P_BIN(float), P_BIN(half_bits), (out, x, y, n, op, s))
#define P_BINS(T) (T* out, const T* x, const T* y, i64 n, int op)
BOTH(binary_same, P_BINS(float), P_BINS(half_bits), (out, x, y, n, op))
#define P_UN(T) (T* out, const T* x, i64 n, int op)
BOTH(unary, P_UN(float), P_UN(half_bits), (out, x, n, op))
#define P_BR(T) (T* y, const T* bias, const T* res, i64 rows, i64 cols)
BOTH(bias_residual, P_BR(float), P_BR(half_bits), (y, bias, res, rows, cols))
#define P_CB(T) (T* y, const T* bias, const T* res, i64 total, i64 channels, i64 spatial)
BOTH(channel_bias, P_CB(float), P_CB(half_bits), (y, bias, res, total, channels, spatial))
#define P_GN(T) \
    (T* y, const T* x, const T* gamma, const T* beta, int C, i64 spatial, int groups, float eps, int silu)
BOTH(group_norm, P_GN(float), P_GN(half_bits), (y, x, gamma, beta, C, spatial, groups, eps, silu))
#define P_LN(T) (T* y, const T* x, const T* gamma, const T* beta, int cols, float eps)
BOTH(layer_norm, P_LN(float), P_LN(half_bits), (y, x, gamma, beta, cols, eps))
#define P_SM(T) (T* y, const T* x, int cols)
BOTH(softmax, P_SM(float), P_SM(half_bits), (y, x, cols))
#define P_GG(T) (T* y, const T* x, i64 rows, i64 d)
BOTH(geglu, P_GG(float), P_GG(half_bits), (y, x, rows, d))
#define P_GA(T) (T* out, const T* table, const i64* ids, i64 n_ids, i64 row, i64 n_rows)
BOTH(gather_rows, P_GA(float), P_GA(half_bits), (out, table, ids, n_ids, row, n_rows))
#define P_CF(T) (T* out, const float* in, i64 n)
BOTH(cast_from_f32, P_CF(float), P_CF(half_bits), (out, in, n))
#define P_CT(T) (float* out, const T* in, i64 n)
BOTH(cast_to_f32, P_CT(float), P_CT(half_bits), (out, in, n))
#define P_FI(T) (T* out, i64 n, float v)
BOTH(fill, P_FI(float), P_FI(half_bits), (out, n, v))

// ---------------------------------------------------------------------------------------------
// Fused attention for float16 (TemporalAttention with long key sequences: the UNet's spatial
// self- and cross-attention). Q [N, L, H*d], K/V [N, S, H*d]; grid (ceil(L/64), H, N), 4 warps;
// each warp owns 16 query rows, keeps Q, the scores and the output accumulator in registers
// (mma.sync m16n8k16 fragment layouts, as in FlashAttention-2) and streams K/V through shared
// memory in tiles of 64 keys with an online softmax. DP is d rounded up to a multiple of 16;
// d must be even (pairs are loaded as 32-bit words). Dynamic shared memory: 2 * 64 * DP * 2 bytes.

#define FA_ROWS 64
#define FA_KEYS 64

template <int DP>
__device__ void flash_attention(const half_bits* __restrict__ q, const half_bits* __restrict__ k,
                                const half_bits* __restrict__ v, half_bits* __restrict__ y,
                                int L, int S, int heads, int d, float scale) {
    MRT_DYN_SMEM(unsigned, smem_u);  // K tile [64][DP/2] words, V tile [64][DP/2] words
    unsigned* ks = smem_u;
    unsigned* vs = smem_u + FA_KEYS * (DP / 2);
    const half_bits* vs_h = (const half_bits*)vs;
    const int n = blockIdx.z, h = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane >> 2, tq = lane & 3;
    const i64 C = (i64)heads * d;
    const int hw = d / 2;  // 32-bit words per head row
    const int row0 = blockIdx.x * FA_ROWS + warp * 16;
    const float sl2 = scale * 1.4426950408889634f;

    // Q fragments (A operand, row-major 16 x DP) straight from global memory.
    unsigned qa[DP / 16][4];
    {
        const unsigned* qw = (const unsigned*)q;
#pragma unroll
        for (int kc = 0; kc < DP / 16; ++kc) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = row0 + grp + ((r & 1) ? 8 : 0);
                const int col = kc * 16 + tq * 2 + ((r & 2) ? 8 : 0);
                unsigned val = 0;
                if (row < L && col < d) val = qw[(((i64)n * L + row) * C + (i64)h * d + col) / 2];
                qa[kc][r] = val;
            }
        }
    }
    float o[DP / 8][4];
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = -1e30f, m1 = -1e30f, l0 = 0.f, l1 = 0.f;  // rows grp, grp + 8

    const unsigned* kw = (const unsigned*)k;
    const unsigned* vw = (const unsigned*)v;
    for (int s0 = 0; s0 < S; s0 += FA_KEYS) {
        __syncthreads();
        for (int i = threadIdx.x; i < FA_KEYS * (DP / 2); i += blockDim.x) {
            const int r = i / (DP / 2), w = i % (DP / 2);
            unsigned kv = 0, vv = 0;
            if (s0 + r < S && w < hw) {
                const i64 g = (((i64)n * S + s0 + r) * C + (i64)h * d) / 2 + w;
                kv = kw[g];
                vv = vw[g];
            }
            ks[i] = kv;
            vs[i] = vv;
        }
        __syncthreads();
        // S = Q K^T for 64 keys: 8 n-tiles of 8 keys.
        float sc[FA_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < DP / 16; ++kc) {
                const unsigned* kr = ks + (j * 8 + grp) * (DP / 2) + kc * 8 + tq;
                mrt_mma_m16n8k16(sc[j], qa[kc], kr[0], kr[4]);
            }
        }
        // online softmax (rows grp and grp + 8; this thread holds 2 columns per n-tile)
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = s0 + j * 8 + tq * 2 + (e & 1);
                sc[j][e] = key < S ? sc[j][e] * sl2 : -1e30f;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[j][0], sc[j][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[j][2], sc[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float r0 = exp2f(m0 - mx0), r1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
            sc[j][0] = exp2f(sc[j][0] - m0);
            sc[j][1] = exp2f(sc[j][1] - m0);
            sc[j][2] = exp2f(sc[j][2] - m1);
            sc[j][3] = exp2f(sc[j][3] - m1);
            ps0 += sc[j][0] + sc[j][1];
            ps1 += sc[j][2] + sc[j][3];
        }
        l0 = l0 * r0 + ps0;
        l1 = l1 * r1 + ps1;
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
            o[j][0] *= r0;
            o[j][1] *= r0;
            o[j][2] *= r1;
            o[j][3] *= r1;
        }
        // O += P V: P (16 x 64) as A fragments from the score registers, V (64 x DP) as B.
#pragma unroll
        for (int kc = 0; kc < FA_KEYS / 16; ++kc) {
            unsigned pa[4];
            pa[0] = mrt_pack_h2(sc[2 * kc][0], sc[2 * kc][1]);
            pa[1] = mrt_pack_h2(sc[2 * kc][2], sc[2 * kc][3]);
            pa[2] = mrt_pack_h2(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            pa[3] = mrt_pack_h2(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
            for (int j = 0; j < DP / 8; ++j) {
                const int col = j * 8 + grp;
                const int key = kc * 16 + tq * 2;
                const unsigned b0 = (unsigned)vs_h[key * DP + col] |
                                    ((unsigned)vs_h[(key + 1) * DP + col] << 16);
                const unsigned b1 = (unsigned)vs_h[(key + 8) * DP + col] |
                                    ((unsigned)vs_h[(key + 9) * DP + col] << 16);
                mrt_mma_m16n8k16(o[j], pa, b0, b1);
            }
        }
    }
    // the row sums are spread over the 4 threads of a row group
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    unsigned* yw = (unsigned*)y;
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
        const int col = j * 8 + tq * 2;
        if (col < d) {
            const int ra = row0 + grp, rb = row0 + grp + 8;
            if (ra < L)
                yw[(((i64)n * L + ra) * C + (i64)h * d + col) / 2] =
                    mrt_pack_h2(o[j][0] * i0, o[j][1] * i0);
            if (rb < L)
                yw[(((i64)n * L + rb) * C + (i64)h * d + col) / 2] =
                    mrt_pack_h2(o[j][2] * i1, o[j][3] * i1);
        }
    }
}

#define FLASH(DP)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_attention_f16_d##DP(                \
        const half_bits* q, const half_bits* k, const half_bits* v, half_bits* y, int L, int S, \
        int heads, int d, float scale) {                                                       \
        flash_attention<DP>(q, k, v, y, L, S, heads, d, scale);                                \
    }
FLASH(16)
FLASH(32)
FLASH(48)
FLASH(64)
FLASH(80)
FLASH(96)
FLASH(128)
FLASH(160)
