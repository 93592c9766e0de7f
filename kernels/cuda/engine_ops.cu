// The native CUDA engine's kernels (runtime/src/engine/exec.rs): everything a fused motionrt graph
// needs besides the GEMMs (cuBLAS) and convolutions (cuDNN). Each kernel exists for float32
// (`_f32`) and float16 (`_f16`, raw 16-bit values converted by the prelude); arithmetic and every
// reduction are float32. The fused attention for long sequences (`flash_attention_f16_dDP`) uses
// the tensor cores through `mma.sync.m16n8k16` with float32 accumulation.
//
// No headers: conversions, warp reductions and the tensor-core instruction come from the prelude
// (prelude.cuh, which kernels/src/cuda.rs prepends before NVRTC compiles this at run time).

typedef long long i64;

// 16 bytes moved as one unit: `copy_strided_b16` copies these (8 halves or 4 floats per element)
// when the innermost axis is contiguous on both sides; the elementwise kernels read and write 16
// bytes per thread where the sizes allow.
struct __align__(16) B16 {
    unsigned w[4];
};

template <typename T>
struct Lanes {
    static constexpr int N = 16 / sizeof(T);
};

// (the emulator's bank statistics count these where they touch shared memory)
#ifdef MOTIONRT_EMU
#define MRT_SHARED16(p, write) ::mrt_emu::shared16((p), (write), mrt_file, mrt_line)
#else
#define MRT_SHARED16(p, write) ((void)0)
#endif
__device__ __forceinline__ void load16(float* f, const float* p MRT_SITE) {
    MRT_SHARED16(p, false);
    const B16 b = *(const B16*)p;
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(b.w[i]);
}
__device__ __forceinline__ void load16(float* f, const half_bits* p MRT_SITE) {
    MRT_SHARED16(p, false);
    const B16 b = *(const B16*)p;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = mrt_h2f((half_bits)(b.w[i] & 0xffffu));
        f[2 * i + 1] = mrt_h2f((half_bits)(b.w[i] >> 16));
    }
}
__device__ __forceinline__ void store16(float* p, const float* f MRT_SITE) {
    MRT_SHARED16(p, true);
    B16 b;
#pragma unroll
    for (int i = 0; i < 4; ++i) b.w[i] = __float_as_uint(f[i]);
    *(B16*)p = b;
}
__device__ __forceinline__ void store16(half_bits* p, const float* f MRT_SITE) {
    MRT_SHARED16(p, true);
    B16 b;
#pragma unroll
    for (int i = 0; i < 4; ++i) b.w[i] = mrt_pack_h2(f[2 * i], f[2 * i + 1]);
    *(B16*)p = b;
}

// v[k] += the 16 bytes at p, as V floats
template <typename T>
__device__ __forceinline__ void add16(float* v, const T* p) {
    float t[Lanes<T>::N];
    load16(t, p);
#pragma unroll
    for (int k = 0; k < Lanes<T>::N; ++k) v[k] += t[k];
}

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

// The offsets of flat element i < the product of dims: the outermost index is what is left of i
// after the inner ones (no division for it).
__device__ __forceinline__ void offsets(const Strided& s, i64 i, i64* oa, i64* ob, i64* oc) {
    i64 a = 0, b = 0, c = 0;
    for (int k = s.rank - 1; k > 0; --k) {
        const i64 d = s.dims[k];
        const i64 ik = i % d;
        i /= d;
        a += ik * s.a[k];
        b += ik * s.b[k];
        c += ik * s.c[k];
    }
    if (s.rank > 0) {
        a += i * s.a[0];
        b += i * s.b[0];
        c += i * s.c[0];
    }
    *oa = a;
    *ob = b;
    *oc = c;
}

// The same in 32-bit arithmetic (64-bit division costs several times more), for iterations whose
// count and offsets all stay below 2^31 (`narrow`).
__device__ __forceinline__ void offsets32(const Strided& s, unsigned i, unsigned* oa, unsigned* ob,
                                          unsigned* oc) {
    unsigned a = 0, b = 0, c = 0;
    for (int k = s.rank - 1; k > 0; --k) {
        const unsigned d = (unsigned)s.dims[k];
        const unsigned ik = i % d;
        i /= d;
        a += ik * (unsigned)s.a[k];
        b += ik * (unsigned)s.b[k];
        c += ik * (unsigned)s.c[k];
    }
    if (s.rank > 0) {
        a += i * (unsigned)s.a[0];
        b += i * (unsigned)s.b[0];
        c += i * (unsigned)s.c[0];
    }
    *oa = a;
    *ob = b;
    *oc = c;
}

__device__ __forceinline__ bool narrow(const Strided& s, i64 n) {
    i64 a = 0, b = 0, c = 0;
    for (int k = 0; k < s.rank; ++k) {
        a += (s.dims[k] - 1) * s.a[k];
        b += (s.dims[k] - 1) * s.b[k];
        c += (s.dims[k] - 1) * s.c[k];
    }
    const i64 lim = 0x7fffffffll;
    return n < lim && a < lim && b < lim && c < lim;
}

#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)
#define GRID_LOOP32(i, n) \
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(n); i += blockDim.x * gridDim.x)

// out[c-offset] = in[a-offset]: Transpose, Slice, Expand, Concat (one launch per input), nearest
// Resize by integer factors (split dims with stride 0).
template <typename T>
__device__ void copy_strided(T* out, const T* in, i64 n, Strided s, i64 in_off, i64 out_off) {
    if (narrow(s, n)) {
        const T* src = in + in_off;
        T* dst = out + out_off;
        GRID_LOOP32(i, n) {
            unsigned a, b, c;
            offsets32(s, i, &a, &b, &c);
            dst[c] = src[a];
        }
        return;
    }
    GRID_LOOP(i, n) {
        i64 a, b, c;
        offsets(s, i, &a, &b, &c);
        out[out_off + c] = in[in_off + a];
    }
}

// A copy that transposes: axis `ai` is contiguous in the input (a-stride 1), axis `ao` in the
// output (c-stride 1), as between NCHW and token layouts. 32 x 32 tiles pass through shared memory
// so that reads and writes are both coalesced. grid (ceil(dims[ai] / 32), ceil(dims[ao] / 32),
// product of the other dims), block (32, 8).
template <typename T>
__device__ void copy_transpose(T* out, const T* in, Strided s, int ai, int ao, i64 in_off,
                               i64 out_off) {
    __shared__ T tile[32][33];
    i64 b = blockIdx.z, ia = in_off, oc = out_off;
    for (int k = s.rank - 1; k >= 0; --k) {
        if (k == ai || k == ao) continue;
        const i64 ik = b % s.dims[k];
        b /= s.dims[k];
        ia += ik * s.a[k];
        oc += ik * s.c[k];
    }
    const i64 ni = s.dims[ai], no = s.dims[ao], ya = s.a[ao], xc = s.c[ai];
    const i64 x0 = (i64)blockIdx.x * 32, y0 = (i64)blockIdx.y * 32;
    const int tx = threadIdx.x;
    for (int j = threadIdx.y; j < 32; j += 8) {
        const i64 x = x0 + tx, y = y0 + j;  // x along ai, y along ao
        if (x < ni && y < no) tile[j][tx] = in[ia + x + y * ya];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += 8) {
        const i64 y = y0 + tx, x = x0 + j;
        if (x < ni && y < no) out[oc + y + x * xc] = tile[tx][j];
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
    if (narrow(s, n)) {
        GRID_LOOP32(i, n) {
            unsigned a, b, c;
            offsets32(s, i, &a, &b, &c);
            mrt_store(out, i, binop(op, mrt_load(x, a), mrt_load(y, b)));
        }
        return;
    }
    GRID_LOOP(i, n) {
        i64 a, b, c;
        offsets(s, i, &a, &b, &c);
        mrt_store(out, i, binop(op, mrt_load(x, a), mrt_load(y, b)));
    }
}

template <typename T>
__device__ void binary_same(T* out, const T* x, const T* y, i64 n, int op) {
    constexpr int V = Lanes<T>::N;
    if (n % V == 0) {
        GRID_LOOP(i, n / V) {
            float a[V], b[V];
            load16(a, x + i * V);
            load16(b, y + i * V);
#pragma unroll
            for (int k = 0; k < V; ++k) a[k] = binop(op, a[k], b[k]);
            store16(out + i * V, a);
        }
        return;
    }
    GRID_LOOP(i, n) mrt_store(out, i, binop(op, mrt_load(x, i), mrt_load(y, i)));
}

// (one MUFU.EX2 and one MUFU.RCP, neither with __expf's or __fdividef's range fix-ups; 1 / inf is
// 0, so SiLU of very negative values is 0 as it should be)
__device__ __forceinline__ float sigmoidf(float x) {
    return mrt_rcp(1.f + mrt_ex2(-1.4426950408889634f * x));
}

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

// y[r, c] += bias[c] + sbias[r / rps, c] + res[r, c]   (bias, sbias, res may be null; sbias is
// a per-sample bias over `rps` rows per sample: a ResNet's time embedding on a channels-last
// convolution)
template <typename T>
__device__ void bias_residual(T* y, const T* bias, const T* sbias, const T* res, i64 rows,
                              i64 cols, i64 rps) {
    constexpr int V = Lanes<T>::N;
    if (cols % V == 0 && rows * cols < 0x7fffffffll) {
        // 16 bytes per thread
        const unsigned uc = (unsigned)cols, urps = (unsigned)rps;
        GRID_LOOP32(i, rows * cols / V) {
            const unsigned e = i * V, c = e % uc;
            float v[V];
            load16(v, y + e);
            if (bias) add16(v, bias + c);
            if (sbias) add16(v, sbias + (e / uc) / urps * uc + c);
            if (res) add16(v, res + e);
            store16(y + e, v);
        }
        return;
    }
    if (rows * cols < 0x7fffffffll) {
        const unsigned uc = (unsigned)cols, urps = (unsigned)rps;
        GRID_LOOP32(i, rows * cols) {
            float v = mrt_load(y, i);
            const unsigned c = i % uc;
            if (bias) v += mrt_load(bias, c);
            if (sbias) v += mrt_load(sbias, (i / uc) / urps * uc + c);
            if (res) v += mrt_load(res, i);
            mrt_store(y, i, v);
        }
        return;
    }
    GRID_LOOP(i, rows * cols) {
        float v = mrt_load(y, i);
        const i64 c = i % cols;
        if (bias) v += mrt_load(bias, c);
        if (sbias) v += mrt_load(sbias, (i / cols) / rps * cols + c);
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

// Merge a part's statistics (nb values, mean mb, centred sum of squares qb) into the running
// (cnt, mean, m2): Chan et al.'s pairwise update.
__device__ __forceinline__ void chan_merge(float& cnt, float& mean, float& m2, float nb,
                                           float mb, float qb) {
    const float delta = mb - mean, tot = cnt + nb;
    mean += delta * (nb / tot);
    m2 += qb + delta * delta * (cnt * nb / tot);
    cnt = tot;
}

// GroupNorm split over several blocks per group, for groups too large for one block (the motion
// modules' GroupNorm across frames has only batch x 32 groups of up to ~10^6 values). A group's
// values are contiguous in [N, C, spatial]; block (g, j) of grid (N * groups, splits) takes the
// chunk [j * chunk, (j + 1) * chunk) of group g.
// 1. group_norm_stats: each chunk's mean and centred sum of squares (two passes, the second from
//    cache) into stats[(g * splits + j) * 2 + {0, 1}] (float32).
// 2. group_norm_apply: each block merges its group's partial statistics (Chan et al.'s pairwise
//    update, in chunk order, the same in every block) and normalises its chunk.
template <typename T>
__device__ void group_norm_stats(float* stats, const T* x, int C, i64 spatial, int groups,
                                 i64 chunk) {
    __shared__ float scratch[32];
    const int ng = blockIdx.x, g = ng % groups, n = ng / groups;
    const i64 count = (i64)(C / groups) * spatial;
    const i64 base = ((i64)n * C + (i64)g * (C / groups)) * spatial;
    const i64 lo = (i64)blockIdx.y * chunk, hi = min(lo + chunk, count);
    float s = 0.f;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) s += mrt_load(x, base + i);
    const float mean = block_sum(s, scratch) / (float)(hi - lo);
    float q = 0.f;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float d = mrt_load(x, base + i) - mean;
        q += d * d;
    }
    q = block_sum(q, scratch);
    if (threadIdx.x == 0) {
        float* o = stats + ((i64)ng * gridDim.y + blockIdx.y) * 2;
        o[0] = mean;
        o[1] = q;
    }
}

template <typename T>
__device__ void group_norm_apply(T* y, const T* x, const float* stats, const T* gamma,
                                 const T* beta, int C, i64 spatial, int groups, i64 chunk,
                                 float eps, int silu) {
    const int ng = blockIdx.x, g = ng % groups, n = ng / groups, cg = C / groups;
    const i64 count = (i64)cg * spatial;
    const i64 base = ((i64)n * C + (i64)g * cg) * spatial;
    const float* st = stats + (i64)ng * gridDim.y * 2;
    float cnt = 0.f, mean = 0.f, m2 = 0.f;
    for (unsigned j = 0; j < gridDim.y; ++j) {
        const float nb = (float)(min((i64)(j + 1) * chunk, count) - (i64)j * chunk);
        chan_merge(cnt, mean, m2, nb, st[2 * j], st[2 * j + 1]);
    }
    const float rstd = rsqrtf(m2 / cnt + eps);
    const i64 lo = (i64)blockIdx.y * chunk, hi = min(lo + chunk, count);
    const bool narrow_group = count < 0x7fffffffll;  // 32-bit division when it can
    const unsigned usp = (unsigned)spatial;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const int c = g * cg + (narrow_group ? (int)((unsigned)i / usp) : (int)(i / spatial));
        float v = (mrt_load(x, base + i) - mean) * rstd * mrt_load(gamma, c) + mrt_load(beta, c);
        if (silu) v = v * sigmoidf(v);
        mrt_store(y, base + i, v);
    }
}

// GroupNorm of a channels-last activation: logical [N, C, spatial...] stored as [N, S, C] (the
// layout of channels-last convolutions). A group is a strided set here (cg channels of every
// position), so the work is split by positions instead:
// 1. group_norm_nhwc_stats, grid (N, splits), blockDim a multiple of 32: the chunk of `chunk`
//    positions [j * chunk, ...) of sample n, read row by row (coalesced); per group its mean and
//    centred sum of squares (two passes, the second from cache) into
//    stats[((n * splits + j) * groups + g) * 2 + {0, 1}]. When C is a multiple of V (8 halves
//    or 4 floats: 16-byte rows), each thread reads V channels of every R-th row with 16-byte
//    loads (R = blockDim / (C / V) row lanes, at least 1), several in flight, and the row lanes'
//    partial sums meet in shared memory: dynamic shared memory (R + 1) * C floats. Otherwise
//    C <= 8 * blockDim (blockDim up to 512: a block of 2560 channels, a concatenation in SD1.5's
//    up blocks, has 320), a thread per channel and up to 8 channels a thread, C floats.
// 2. group_norm_nhwc_finalize, one thread per (n, g): merges the splits' statistics (as
//    group_norm_apply does) into mr[(n * groups + g) * 2 + {0, 1}] = mean, 1 / sqrt(var + eps).
// 3. group_norm_nhwc_apply: normalise, affine, optional SiLU (its geometry below).
// The input may come with the biases of the convolution before it, added on the fly: xb [C] and
// xsb [N, C] (a ResNet's bias and time embedding; either may be null), so that convolution needs
// no pass of its own.
template <typename T>
__device__ __forceinline__ float gn_in_bias(const T* xb, const T* xsb, int n, int C, int c) {
    float a = 0.f;
    if (xb) a += mrt_load(xb, c);
    if (xsb) a += mrt_load(xsb, (i64)n * C + c);
    return a;
}

// Per channel, the sum over the chunk's rows of x - center[c] (SQUARE: of its square; center
// null: of x), into part[0, C): each item (row lane rl, channels jc * V ..) sums rows rl, rl + R,
// ... with 16-byte loads, several in flight, into part[rl * C + ..]; then the row lanes' sums
// meet. Ends with the block synchronised.
template <bool SQUARE, typename T>
__device__ __forceinline__ void gn_lane_sums(float* part, const float* center, const T* xs,
                                             i64 rows, int C, int R, int cv) {
    constexpr int V = Lanes<T>::N;
    for (int it = threadIdx.x; it < R * cv; it += blockDim.x) {
        const int jc = it % cv, rl = it / cv;
        float acc[V], mean[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
            acc[k] = 0.f;
            mean[k] = center ? center[jc * V + k] : 0.f;
        }
#pragma unroll 4
        for (i64 r = rl; r < rows; r += R) {
            float v[V];
            load16(v, xs + r * C + jc * V);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float d = v[k] - mean[k];
                acc[k] += SQUARE ? d * d : d;
            }
        }
#pragma unroll
        for (int k = 0; k < V; ++k) part[rl * C + jc * V + k] = acc[k];
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = part[c];
        for (int l = 1; l < R; ++l) s += part[l * C + c];
        part[c] = s;
    }
    __syncthreads();
}

// The vectorised statistics (C a multiple of V): `part` holds R * C row-lane partial sums, then
// `gm` [C] after them each channel's group mean less the channel's input bias.
template <typename T>
__device__ void gn_nhwc_stats_vec(float* st, float* part, const T* xs, i64 rows, const T* xb,
                                  const T* xsb, int n, int C, int groups) {
    constexpr int V = Lanes<T>::N;
    const int cg = C / groups, cv = C / V, nt = blockDim.x;
    const int R = cv <= nt ? nt / cv : 1;
    float* gm = part + R * C;
    const float cnt = (float)(rows * cg);
    gn_lane_sums<false>(part, (const float*)nullptr, xs, rows, C, R, cv);
    // the input biases: each of the chunk's rows holds them once per channel
    for (int c = threadIdx.x; c < C; c += nt) part[c] += (float)rows * gn_in_bias(xb, xsb, n, C, c);
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += nt) {
        const int g0 = (c / cg) * cg;
        float m = 0.f;
        for (int i = 0; i < cg; ++i) m += part[g0 + i];
        gm[c] = m / cnt - gn_in_bias(xb, xsb, n, C, c);
    }
    __syncthreads();
    // centred sums of squares (the chunk again, from cache)
    gn_lane_sums<true>(part, gm, xs, rows, C, R, cv);
    for (int g = threadIdx.x; g < groups; g += nt) {
        float q = 0.f;
        for (int i = 0; i < cg; ++i) q += part[g * cg + i];
        st[2 * g + 1] = q;
        st[2 * g] = gm[g * cg] + gn_in_bias(xb, xsb, n, C, g * cg);
    }
}

template <typename T>
__device__ void group_norm_nhwc_stats(float* stats, const T* x, const T* xb, const T* xsb, int C,
                                      i64 S, int groups, i64 chunk) {
    MRT_DYN_SMEM(float, part);  // [(R + 1) * C] vectorised, else [C]
    const int n = blockIdx.x, j = blockIdx.y, cg = C / groups;
    const i64 p0 = (i64)j * chunk, p1 = min(p0 + chunk, S);
    const T* xs = x + ((i64)n * S + p0) * C;
    const i64 rows = p1 - p0;
    if (C % Lanes<T>::N == 0) {
        gn_nhwc_stats_vec(stats + ((i64)n * gridDim.y + j) * groups * 2, part, xs, rows, xb, xsb,
                          n, C, groups);
        return;
    }
    float acc[8];
    // pass 1: per-channel sums -> group means
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.f;
    for (i64 r = 0; r < rows; ++r) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < C) acc[k] += mrt_load(xs, r * C + c);
        }
    }
    // the input biases: each of the chunk's rows holds them once per channel
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < C) part[c] = acc[k] + (float)rows * gn_in_bias(xb, xsb, n, C, c);
    }
    __syncthreads();
    const float cnt = (float)(rows * cg);
    // mean[k]: the group's mean less this channel's input bias (what x itself is centred by)
    float mean[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        float m = 0.f;
        if (c < C) {
            const int g0 = (c / cg) * cg;
            for (int i = 0; i < cg; ++i) m += part[g0 + i];
            m = m / cnt - gn_in_bias(xb, xsb, n, C, c);
        }
        mean[k] = m;
        acc[k] = 0.f;
    }
    __syncthreads();
    // pass 2: centred sums of squares
    for (i64 r = 0; r < rows; ++r) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < C) {
                const float d = mrt_load(xs, r * C + c) - mean[k];
                acc[k] += d * d;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < C) part[c] = acc[k];
    }
    __syncthreads();
    // per group: the centred sum of squares, and the mean (every channel's thread holds its
    // group's; the group's first channel writes it)
    float* st = stats + ((i64)n * gridDim.y + j) * groups * 2;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float q = 0.f;
        for (int i = 0; i < cg; ++i) q += part[g * cg + i];
        st[2 * g + 1] = q;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < C && c % cg == 0) st[2 * (c / cg)] = mean[k] + gn_in_bias(xb, xsb, n, C, c);
    }
}

__device__ void gn_nhwc_finalize(float* mr, const float* stats, int N, int C, i64 S, int groups,
                                 i64 chunk, int splits, float eps) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * groups) return;
    const int n = t / groups, g = t % groups, cg = C / groups;
    float cnt = 0.f, mean = 0.f, m2 = 0.f;
    for (int j = 0; j < splits; ++j) {
        const float* st = stats + (((i64)n * splits + j) * groups + g) * 2;
        const float nb = (float)((min((i64)(j + 1) * chunk, S) - (i64)j * chunk) * cg);
        chan_merge(cnt, mean, m2, nb, st[0], st[1]);
    }
    mr[2 * t] = mean;
    mr[2 * t + 1] = rsqrtf(m2 / cnt + eps);
}

// 3. group_norm_nhwc_apply. With rows of whole 16-byte vectors (C a multiple of V): grid
//    (position blocks, min(N, 65535)), blockDim cv * R (cv = C / V vectors a row, R >= 1 row
//    lanes): a thread keeps one vector of channels of a sample (blockIdx.y, then gridDim.y
//    apart) and steps through positions gridDim.x * R apart, its channels' shift (mean less the
//    input biases), scale (inverse deviation times gamma) and beta computed once a sample, so a
//    value costs a subtraction and an FMA (and SiLU's). Otherwise a grid-stride loop over
//    values, any 1-D geometry.
template <typename T>
__device__ void group_norm_nhwc_apply(T* y, const T* x, const T* xb, const T* xsb, const float* mr,
                                      const T* gamma, const T* beta, int C, i64 S, int groups,
                                      i64 total, int silu) {
    const int cg = C / groups;
    constexpr int V = Lanes<T>::N;
    if (C % V == 0) {
        // (the launcher gives blockDim >= cv: R >= 1)
        const int cv = C / V, R = blockDim.x / cv;
        if ((int)threadIdx.x >= R * cv) return;
        const int c0 = (threadIdx.x % cv) * V;
        const i64 N = total / (S * C), step = (i64)gridDim.x * R;
        // samples gridDim.y apart (gridDim.y is at most 65535)
        for (i64 n = blockIdx.y; n < N; n += gridDim.y) {
            float sh[V], sc[V], be[V];
            load16(sc, gamma + c0);
            load16(be, beta + c0);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float* st = mr + (n * groups + (c0 + k) / cg) * 2;
                sh[k] = st[0] - gn_in_bias(xb, xsb, (int)n, C, c0 + k);
                sc[k] *= st[1];
            }
            for (i64 p = (i64)blockIdx.x * R + threadIdx.x / cv; p < S; p += step) {
                const i64 e = (n * S + p) * C + c0;
                float v[V];
                load16(v, x + e);
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    v[k] = (v[k] - sh[k]) * sc[k] + be[k];
                    if (silu) v[k] = v[k] * sigmoidf(v[k]);
                }
                store16(y + e, v);
            }
        }
        return;
    }
    if (total < 0x7fffffffll) {
        const unsigned uc = (unsigned)C, usc = (unsigned)(S * C);
        GRID_LOOP32(i, total) {
            const unsigned c = i % uc, n = i / usc;
            const float* st = mr + (n * groups + c / cg) * 2;
            const float xi = mrt_load(x, i) + gn_in_bias(xb, xsb, (int)n, C, (int)c);
            float v = (xi - st[0]) * st[1] * mrt_load(gamma, c) + mrt_load(beta, c);
            if (silu) v = v * sigmoidf(v);
            mrt_store(y, i, v);
        }
        return;
    }
    GRID_LOOP(i, total) {
        const int c = (int)(i % C);
        const i64 n = i / (S * C);
        const float* st = mr + (n * groups + c / cg) * 2;
        const float xi = mrt_load(x, i) + gn_in_bias(xb, xsb, (int)n, C, c);
        float v = (xi - st[0]) * st[1] * mrt_load(gamma, c) + mrt_load(beta, c);
        if (silu) v = v * sigmoidf(v);
        mrt_store(y, i, v);
    }
}

// LayerNormalization over the last axis (cols): one block per row. `add` (optional): a table of
// `period` rows, row (r / div) % period added to the output row r (the motion modules' positional
// encoding; div > 1 when the rows are frame-major).
template <typename T>
__device__ void layer_norm(T* y, const T* x, const T* gamma, const T* beta, const T* add,
                           int period, int div, int cols, float eps) {
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
    const i64 arow = add ? (i64)((blockIdx.x / (unsigned)div) % (unsigned)period) * cols : 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = (mrt_load(x, base + i) - mean) * rstd * mrt_load(gamma, i);
        if (beta) v += mrt_load(beta, i);
        if (add) v += mrt_load(add, arow + i);
        mrt_store(y, base + i, v);
    }
}

// LayerNormalization of rows up to 32 * LN_WARP_PER_LANE = 1280 wide (SD1.5's widest, 1280
// channels): one warp per row, the row held in registers (one read, one write; no block
// barriers). blockDim.x a multiple of 32. Rows of whole 16-byte vectors (every pointer 16-byte
// aligned) take ln_warp_vec: KV vectors a lane, KV = ceil(cols / (32 V)) chosen at run time among
// compiled sizes, so a lane issues the loads and arithmetic of the row's vectors only (a 320-wide
// float16 row: 2 vector slots a lane, where the scalar path below issues all 40 of its value
// slots, predicated); other rows take the scalar path, a value a lane at a time.
#define LN_WARP_PER_LANE 40
template <typename T, int KV>
__device__ __forceinline__ void ln_warp_vec(T* y, const T* x, const T* gamma, const T* beta,
                                            const T* add, int period, int div, i64 row, int cols,
                                            float eps, int lane) {
    constexpr int V = Lanes<T>::N;
    const int nv = cols / V;
    const T* xr = x + row * cols;
    float v[KV][V];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
        const int j = lane + 32 * k;
        if (j < nv) {
            load16(v[k], xr + j * V);
#pragma unroll
            for (int e = 0; e < V; ++e) s += v[k][e];
        }
    }
    const float mean = mrt_warp_sum(s) / (float)cols;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
        if (lane + 32 * k < nv) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
                v[k][e] -= mean;
                q += v[k][e] * v[k][e];
            }
        }
    }
    const float rstd = rsqrtf(mrt_warp_sum(q) / (float)cols + eps);
    T* yr = y + row * cols;
    const T* ar = add ? add + ((row / div) % period) * cols : add;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
        const int j = lane + 32 * k;
        if (j < nv) {
            float g[V];
            load16(g, gamma + j * V);
#pragma unroll
            for (int e = 0; e < V; ++e) v[k][e] *= rstd * g[e];
            if (beta) add16(v[k], beta + j * V);
            if (ar) add16(v[k], ar + j * V);
            store16(yr + j * V, v[k]);
        }
    }
}

// ln_warp_vec with KV = kv, for the KV that fit the per-lane budget (KV * V <= LN_WARP_PER_LANE).
template <typename T, int KV>
__device__ __forceinline__ bool ln_warp_vec_kv(int kv, T* y, const T* x, const T* gamma,
                                               const T* beta, const T* add, int period, int div,
                                               i64 row, int cols, float eps, int lane) {
    if constexpr (KV * Lanes<T>::N > LN_WARP_PER_LANE) {
        return false;
    } else {
        if (kv != KV)
            return ln_warp_vec_kv<T, KV + 1>(kv, y, x, gamma, beta, add, period, div, row, cols,
                                             eps, lane);
        ln_warp_vec<T, KV>(y, x, gamma, beta, add, period, div, row, cols, eps, lane);
        return true;
    }
}

template <typename T>
__device__ void layer_norm_warp(T* y, const T* x, const T* gamma, const T* beta, const T* add,
                                int period, int div, i64 rows, int cols, float eps) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    constexpr int V = Lanes<T>::N;
    const unsigned long long al = (unsigned long long)x | (unsigned long long)y |
                                  (unsigned long long)gamma | (unsigned long long)beta |
                                  (unsigned long long)add;
    if (cols % V == 0 && (al & 15) == 0 &&
        ln_warp_vec_kv<T, 1>((cols / V + 31) / 32, y, x, gamma, beta, add, period, div, row, cols,
                             eps, lane))
        return;
    const T* xr = x + row * cols;
    float v[LN_WARP_PER_LANE];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LN_WARP_PER_LANE; ++k) {
        const int c = lane + 32 * k;
        v[k] = c < cols ? mrt_load(xr, c) : 0.f;
        s += v[k];
    }
    const float mean = mrt_warp_sum(s) / (float)cols;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_WARP_PER_LANE; ++k) {
        const int c = lane + 32 * k;
        const float d = c < cols ? v[k] - mean : 0.f;
        q += d * d;
    }
    const float rstd = rsqrtf(mrt_warp_sum(q) / (float)cols + eps);
    T* yr = y + row * cols;
    const T* ar = add ? add + ((row / div) % period) * cols : add;
#pragma unroll
    for (int k = 0; k < LN_WARP_PER_LANE; ++k) {
        const int c = lane + 32 * k;
        if (c < cols) {
            float o = (v[k] - mean) * rstd * mrt_load(gamma, c);
            if (beta) o += mrt_load(beta, c);
            if (ar) o += mrt_load(ar, c);
            mrt_store(yr, c, o);
        }
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

// erf(x) by Abramowitz & Stegun 7.1.26: 1 - t (a1 + t (a2 + ... + t a5)) e^(-x^2), t = 1 / (1 +
// p |x|), odd; |error| <= 1.5e-7 (below float32's resolution of erf near 1), plus the hardware
// reciprocal's and exponential's few ulp. Twelve instructions and two MUFU where erff takes about
// thirty (both of its branches, selected): GEGLU's arithmetic then stays well under its memory
// traffic.
__device__ __forceinline__ float erf_fast(float x) {
    const float ax = fabsf(x);
    const float t = mrt_rcp(fmaf(0.3275911f, ax, 1.f));
    float p = fmaf(t, 1.061405429f, -1.453152027f);
    p = fmaf(t, p, 1.421413741f);
    p = fmaf(t, p, -0.284496736f);
    p = fmaf(t, p, 0.254829592f) * t;
    const float r = fmaf(-p, mrt_ex2(-1.4426950408889634f * ax * ax), 1.f);
    return copysignf(r, x);
}

// y[r, j] = a * gelu(g) with a = x[r, j] + bias[j], g = x[r, d + j] + bias[d + j] (erf GELU, erf
// as above; bias may be null: the projection's bias, moved here from its GEMM)
__device__ __forceinline__ float geglu1(float a, float g) {
    return a * 0.5f * g * (1.f + erf_fast(g * 0.70710678118654752f));
}
template <typename T>
__device__ void geglu(T* y, const T* x, const T* bias, i64 rows, i64 d) {
    constexpr int V = Lanes<T>::N;
    if (d % V == 0 && rows * 2 * d < 0x7fffffffll) {
        const unsigned vd = (unsigned)(d / V), ud = (unsigned)d;
        GRID_LOOP32(i, rows * (d / V)) {
            const unsigned r = i / vd, j = (i - r * vd) * V;
            float a[V], g[V];
            load16(a, x + r * 2 * ud + j);
            load16(g, x + r * 2 * ud + ud + j);
            if (bias) {
                add16(a, bias + j);
                add16(g, bias + ud + j);
            }
#pragma unroll
            for (int k = 0; k < V; ++k) a[k] = geglu1(a[k], g[k]);
            store16(y + r * ud + j, a);
        }
        return;
    }
    if (rows * 2 * d < 0x7fffffffll) {
        const unsigned ud = (unsigned)d;
        GRID_LOOP32(i, rows * d) {
            const unsigned r = i / ud, j = i - r * ud;
            float a = mrt_load(x, r * 2 * ud + j), g = mrt_load(x, r * 2 * ud + ud + j);
            if (bias) {
                a += mrt_load(bias, j);
                g += mrt_load(bias, ud + j);
            }
            mrt_store(y, i, geglu1(a, g));
        }
        return;
    }
    GRID_LOOP(i, rows * d) {
        const i64 r = i / d, j = i % d;
        float a = mrt_load(x, r * 2 * d + j), g = mrt_load(x, r * 2 * d + d + j);
        if (bias) {
            a += mrt_load(bias, j);
            g += mrt_load(bias, d + j);
        }
        mrt_store(y, i, geglu1(a, g));
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
// kernels launched with up to 512 threads a block: at most 128 registers a thread, or the
// launch is refused (the bound makes ptxas keep to it)
#define ENTRY512(NAME, T, SUF, PARAMS, ARGS) \
    extern "C" __global__ void __launch_bounds__(512) NAME##_##SUF PARAMS { NAME<T> ARGS; }
#define BOTH512(NAME, PARAMS_F, PARAMS_H, ARGS) \
    ENTRY512(NAME, float, f32, PARAMS_F, ARGS)  \
    ENTRY512(NAME, half_bits, f16, PARAMS_H, ARGS)

#define P_COPY(T) (T* out, const T* in, i64 n, Strided s, i64 in_off, i64 out_off)
BOTH(copy_strided, P_COPY(float), P_COPY(half_bits), (out, in, n, s, in_off, out_off))
// copy_strided over 16-byte units (the launcher divides the innermost extent and every stride
// and offset by the elements per unit)
ENTRY(copy_strided, B16, b16, P_COPY(B16), (out, in, n, s, in_off, out_off))
// int64 tensors (token ids) whatever the engine's float type
ENTRY(copy_strided, i64, i64, P_COPY(i64), (out, in, n, s, in_off, out_off))
#define P_TR(T) (T* out, const T* in, Strided s, int ai, int ao, i64 in_off, i64 out_off)
BOTH(copy_transpose, P_TR(float), P_TR(half_bits), (out, in, s, ai, ao, in_off, out_off))
#define P_BIN(T) (T* out, const T* x, const T* y, i64 n, int op, Strided s)
BOTH(binary, P_BIN(float), P_BIN(half_bits), (out, x, y, n, op, s))
#define P_BINS(T) (T* out, const T* x, const T* y, i64 n, int op)
BOTH(binary_same, P_BINS(float), P_BINS(half_bits), (out, x, y, n, op))
#define P_UN(T) (T* out, const T* x, i64 n, int op)
BOTH(unary, P_UN(float), P_UN(half_bits), (out, x, n, op))
#define P_BR(T) (T* y, const T* bias, const T* sbias, const T* res, i64 rows, i64 cols, i64 rps)
BOTH(bias_residual, P_BR(float), P_BR(half_bits), (y, bias, sbias, res, rows, cols, rps))
#define P_CB(T) (T* y, const T* bias, const T* res, i64 total, i64 channels, i64 spatial)
BOTH(channel_bias, P_CB(float), P_CB(half_bits), (y, bias, res, total, channels, spatial))
#define P_GN(T) \
    (T* y, const T* x, const T* gamma, const T* beta, int C, i64 spatial, int groups, float eps, int silu)
BOTH512(group_norm, P_GN(float), P_GN(half_bits), (y, x, gamma, beta, C, spatial, groups, eps, silu))
#define P_GS(T) (float* stats, const T* x, int C, i64 spatial, int groups, i64 chunk)
BOTH(group_norm_stats, P_GS(float), P_GS(half_bits), (stats, x, C, spatial, groups, chunk))
#define P_GA2(T)                                                                               \
    (T* y, const T* x, const float* stats, const T* gamma, const T* beta, int C, i64 spatial, \
     int groups, i64 chunk, float eps, int silu)
BOTH(group_norm_apply, P_GA2(float), P_GA2(half_bits),
     (y, x, stats, gamma, beta, C, spatial, groups, chunk, eps, silu))
#define P_GNS(T) \
    (float* stats, const T* x, const T* xb, const T* xsb, int C, i64 S, int groups, i64 chunk)
BOTH512(group_norm_nhwc_stats, P_GNS(float), P_GNS(half_bits),
     (stats, x, xb, xsb, C, S, groups, chunk))
extern "C" __global__ void group_norm_nhwc_finalize(float* mr, const float* stats, int N,
                                                        int C, i64 S, int groups, i64 chunk,
                                                        int splits, float eps) {
    gn_nhwc_finalize(mr, stats, N, C, S, groups, chunk, splits, eps);
}
// group_norm_nhwc_coeffs, one thread per (n, c) (grid-stride): ab[(n * C + c) * 2 + {0, 1}] =
// (a, b) with silu?(x * a + b) what group_norm_nhwc_apply makes of input x (its input biases
// included): a = gamma * rstd, b = beta - (mean - bias) * a. conv_igemm_gn_f16_nBN reads them.
template <typename T>
__device__ void group_norm_nhwc_coeffs(float* ab, const float* mr, const T* gamma, const T* beta,
                                       const T* xb, const T* xsb, int N, int C, int groups) {
    const int cg = C / groups;
    GRID_LOOP(i, (i64)N * C) {
        const int n = (int)(i / C), c = (int)(i % C);
        const float* st = mr + ((i64)n * groups + c / cg) * 2;
        const float a = mrt_load(gamma, c) * st[1];
        ab[2 * i] = a;
        ab[2 * i + 1] = mrt_load(beta, c) - (st[0] - gn_in_bias(xb, xsb, n, C, c)) * a;
    }
}
// layer_norm_stats, one warp per row (blockDim a multiple of 32): rs[2 r] = 1 / sqrt(var + eps),
// rs[2 r + 1] = -mean * rs[2 r] of row r (two passes, the second from cache), so that
// (x * rs[2 r] + rs[2 r + 1]) * gamma + beta is what layer_norm_warp writes (conv_igemm_ln
// reads them); rows of whole 16-byte vectors 16 bytes a lane at a time.
template <typename T>
__device__ void layer_norm_stats(float* rs, const T* x, i64 rows, int cols, float eps) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    constexpr int V = Lanes<T>::N;
    const T* xr = x + row * cols;
    const bool vec = cols % V == 0 && ((unsigned long long)xr & 15) == 0;
    // the row's sum of x - c (sq: of its square), every lane
    auto pass = [&](float c, bool sq) {
        float a = 0.f;
        if (vec) {
            for (int j = lane; j < cols / V; j += 32) {
                float v[V];
                load16(v, xr + j * V);
#pragma unroll
                for (int e = 0; e < V; ++e) a += sq ? (v[e] - c) * (v[e] - c) : v[e] - c;
            }
        } else {
            for (int i = lane; i < cols; i += 32) {
                const float d = mrt_load(xr, i) - c;
                a += sq ? d * d : d;
            }
        }
        return mrt_warp_sum(a);
    };
    const float mean = pass(0.f, false) / (float)cols;
    const float rstd = rsqrtf(pass(mean, true) / (float)cols + eps);
    if (lane == 0) {
        rs[2 * row] = rstd;
        rs[2 * row + 1] = -mean * rstd;
    }
}
#define P_LNS(T) (float* rs, const T* x, i64 rows, int cols, float eps)
BOTH(layer_norm_stats, P_LNS(float), P_LNS(half_bits), (rs, x, rows, cols, eps))
#define P_GNC(T) \
    (float* ab, const float* mr, const T* gamma, const T* beta, const T* xb, const T* xsb, int N, int C, int groups)
BOTH(group_norm_nhwc_coeffs, P_GNC(float), P_GNC(half_bits),
     (ab, mr, gamma, beta, xb, xsb, N, C, groups))
#define P_GNA(T)                                                                          \
    (T* y, const T* x, const T* xb, const T* xsb, const float* mr, const T* gamma,           \
     const T* beta, int C, i64 S, int groups, i64 total, int silu)
BOTH(group_norm_nhwc_apply, P_GNA(float), P_GNA(half_bits),
     (y, x, xb, xsb, mr, gamma, beta, C, S, groups, total, silu))
#define P_LN(T)                                                                              \
    (T* y, const T* x, const T* gamma, const T* beta, const T* add, int period, int div, int cols, \
     float eps)
BOTH(layer_norm, P_LN(float), P_LN(half_bits), (y, x, gamma, beta, add, period, div, cols, eps))
#define P_SM(T) (T* y, const T* x, int cols)
BOTH(softmax, P_SM(float), P_SM(half_bits), (y, x, cols))
#define P_GG(T) (T* y, const T* x, const T* bias, i64 rows, i64 d)
BOTH(geglu, P_GG(float), P_GG(half_bits), (y, x, bias, rows, d))
#define P_LW(T)                                                                                 \
    (T* y, const T* x, const T* gamma, const T* beta, const T* add, int period, int div, i64 rows, \
     int cols, float eps)
BOTH(layer_norm_warp, P_LW(float), P_LW(half_bits),
     (y, x, gamma, beta, add, period, div, rows, cols, eps))
#define P_GA(T) (T* out, const T* table, const i64* ids, i64 n_ids, i64 row, i64 n_rows)
BOTH(gather_rows, P_GA(float), P_GA(half_bits), (out, table, ids, n_ids, row, n_rows))
#define P_CF(T) (T* out, const float* in, i64 n)
BOTH(cast_from_f32, P_CF(float), P_CF(half_bits), (out, in, n))
#define P_CT(T) (float* out, const T* in, i64 n)
BOTH(cast_to_f32, P_CT(float), P_CT(half_bits), (out, in, n))
#define P_FI(T) (T* out, i64 n, float v)
BOTH(fill, P_FI(float), P_FI(half_bits), (out, n, v))

// ---------------------------------------------------------------------------------------------
// Fused attention for float16 on the tensor cores (TemporalAttention: the UNet's spatial self- and
// cross-attention, the motion modules' attention over frames, the text encoder's and the VAE's
// attention). Q [N, L, H*d], K/V [N, S, H*d] with row strides ldq and ldkv (H*d each alone; 3*H*d
// when Q, K and V are column blocks of one projection's output, 2*H*d for K and V), Y [N, L, H*d]
// contiguous. With `ns` sequences interleaved, sequence n's token t is row
// (n / ns) * T * ns + n % ns + t * ns (T = L for Q and Y, S for K and V): the motion modules'
// frames of one position in frame-major activations ([B, F, H*W] rows, ns = H*W); ns = 1 is
// sequences one after another. Every product is
// `mma.sync.m16n8k16` with float32 accumulation and an online softmax, as in FlashAttention-2.
//
// Two kernels share the per-warp work (16 query rows against a tile of keys):
// - `attention_tiled_f16_dDP` (long queries): a block of 8 warps owns 128 query rows of one
//   (sequence, head); 64-key tiles of K and V stream through shared memory, double-buffered
//   with cp.async so the next tile loads while this one is multiplied.
// - `attention_short{1,2}_f16_dDP` (L <= 16 or 32: attention over frames): one warp per
//   (sequence, head), 16 or 32 query rows, key tiles of the same size; no block barriers.
//
// d must be a multiple of 8 (16-byte rows) and at most 160; DP is d rounded up to 16, the
// columns d..DP are zero in shared memory. Shared rows are DP + 8 halves long, an odd number of
// 16-byte chunks, so the 8 row addresses of an ldmatrix hit distinct banks.

#define ATT_KEYS 64   // keys per tile (tiled kernel)
#define ATT_WARPS 8   // warps per block (tiled kernel): 128 query rows
#define ATT_SHORT_WARPS 4

// The first row of sequence n of T tokens, `ns` sequences interleaved.
__device__ __forceinline__ i64 att_seq_row(int n, int T, int ns) {
    return (i64)(n / ns) * T * ns + n % ns;
}

// The shared-memory slot of load slot i: chunk c of row r, eight consecutive slots one chunk of
// eight consecutive rows (a quarter warp, the phase of a 16-byte shared access: rows DP + 8
// halves apart, an odd number of 16-byte chunks, so in distinct banks; consecutive chunks of one
// row put a row's last chunks and the next row's first in the same banks), CH chunks a row
// (a compile-time constant: DP / 8, or d / 8 where d is one, ONES).
template <unsigned CH>
__device__ __forceinline__ void att_slot(unsigned i, unsigned& r, unsigned& c) {
    const unsigned q = i >> 3, rb = q / CH;
    c = q - rb * CH;
    r = rb * 8 + (i & 7);
}

// ROWS (a multiple of 8) rows of `d` halves (row r at g + r * gstride) into shared rows of
// pitch DP + 8 at s with 16-byte cp.async by NT threads (tid < NT, NT a multiple of 8). Rows
// from `valid` on are zero-filled (plain stores). The slots are ROWS x CH chunks (att_slot);
// chunks past d (the padding, zeroed once by att_zero_cols; a whole quarter warp's) are
// skipped. (The tiled kernel's K and V tiles: att_load_kv_tile.)
template <int DP, bool ONES, int ROWS, int NT>
__device__ __forceinline__ void att_load_rows(half_bits* s, const half_bits* g, i64 gstride,
                                              int valid, int d, int tid) {
    constexpr unsigned CH = ONES ? DP / 8 - 1 : DP / 8, SLOTS = ROWS * CH;
    const unsigned chunks = (unsigned)d >> 3, e = (unsigned)tid & 7;
    // slot i = 8 q + e (att_slot); a rolled loop (unrolled, the K and V loads of the short
    // kernels spill registers at DP = 32, MT = 2)
#pragma unroll 1
    for (unsigned q = (unsigned)tid >> 3; q < SLOTS / 8; q += NT / 8) {
        const unsigned rb = q / CH, c = q - rb * CH, r = rb * 8 + e;
        if (c >= chunks) continue;
        const unsigned so = r * (DP + 8) + c * 8;
        if ((int)r < valid) {
            const i64 go = (i64)r * gstride + c * 8;
            mrt_cp_async_16(s + so, g + go);
        } else {
            unsigned* w = (unsigned*)(s + so);
            w[0] = w[1] = w[2] = w[3] = 0u;
        }
    }
}

// Zero the padding columns [d, DP) of `rows` shared rows. With ONES (d = DP - 8, a compile-time
// head size), column d of the V rows (the last `blk` rows of every `per * blk`) is 1.0 instead:
// P V's last n-tile then sums each row's weights (the softmax denominator) on the tensor cores.
template <int DP, bool ONES>
__device__ __forceinline__ void att_zero_cols(half_bits* s, int rows, int d, int tid,
                                              int nthreads, int blk, int per) {
    const int w = DP - d;
    for (int i = tid; i < rows * w; i += nthreads) {
        const int row = i / w, col = d + i % w;
        const bool one = ONES && col == d && (row / blk) % per == per - 1;
        s[row * (DP + 8) + col] = one ? (half_bits)0x3c00 : (half_bits)0;
    }
}

// One 64-key tile of K and V (rows at kg and vg, token stride tkv; keys from `valid` on
// zero-filled) into a stage of the tiled kernel (K rows at s, V rows ATT_KEYS rows on) by its
// NT threads (slots as att_load_rows'). Each thread's slots (row, 16-byte chunk) are the same in
// every tile, so their offsets do not depend on the tile: computed once a kernel rather than
// once a tile.
template <int DP, bool ONES, unsigned NT = ATT_WARPS * 32>
__device__ __forceinline__ void att_load_kv_tile(half_bits* s, const half_bits* kg,
                                                 const half_bits* vg, i64 tkv, int valid, int d,
                                                 int tid) {
    constexpr unsigned CH = ONES ? DP / 8 - 1 : DP / 8, SLOTS = ATT_KEYS * CH;
    const unsigned chunks = (unsigned)d >> 3;
#pragma unroll
    for (unsigned j = 0; j < (SLOTS + NT - 1) / NT; ++j) {
        const unsigned i = (unsigned)tid + j * NT;
        unsigned r, c;
        att_slot<CH>(i, r, c);
        if ((SLOTS % NT != 0 && i >= SLOTS) || c >= chunks) continue;
        const unsigned so = r * (DP + 8) + c * 8, vo = so + ATT_KEYS * (DP + 8);
        if ((int)r < valid) {
            const i64 go = (i64)r * tkv + c * 8;
            mrt_cp_async_16(s + so, kg + go);
            mrt_cp_async_16(s + vo, vg + go);
        } else {
            unsigned* w = (unsigned*)(s + so);
            w[0] = w[1] = w[2] = w[3] = 0u;
            w = (unsigned*)(s + vo);
            w[0] = w[1] = w[2] = w[3] = 0u;
        }
    }
}

// How far (log2) a row's max may pass the max its weights are taken against before the
// attention kernels rescale (att_softmax).
#define ATT_RESCALE_LOG2 8.f

// One warp's 16 query rows: Q as A fragments, the output accumulator, and the running max and
// sum of rows grp and grp + 8 (grp = lane / 4).
template <int DP>
struct AttRows {
    unsigned qa[DP / 16][4];
    float o[DP / 8][4];
    float m0, m1, l0, l1;
};

// Load the A fragments of 16 rows at `s` (pitch DP + 8) and reset the accumulators.
template <int DP>
__device__ __forceinline__ void att_begin(AttRows<DP>& r, const half_bits* s, int lane) {
    const int mi = lane >> 3;
    const half_bits* row = s + ((mi & 1) * 8 + (lane & 7)) * (DP + 8) + (mi >> 1) * 8;
#pragma unroll
    for (int kc = 0; kc < DP / 16; ++kc) mrt_ldmatrix_x4(r.qa[kc], row + kc * 16);
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) r.o[j][0] = r.o[j][1] = r.o[j][2] = r.o[j][3] = 0.f;
    r.m0 = r.m1 = -1e30f;
    r.l0 = r.l1 = 0.f;
}

// The online softmax of one 16-row tile's scores sc (NT n-tiles of 8 keys, from key0): the
// running max and sum of r updated, its output rescaled, sc turned into the weights. LAZY (the
// tiled kernels, which step through many key tiles): the rescale only where a max grows past
// ATT_RESCALE_LOG2 (below).
template <int DP, int NT, bool ONES, bool LAZY>
__device__ __forceinline__ void att_softmax(AttRows<DP>& r, float (&sc)[NT][4], int key0, int S,
                                            float sl2, int lane) {
    const int tq = lane & 3;
    // online softmax on the unscaled scores; this thread holds columns 2tq, 2tq + 1 of each
    // n-tile. Keys past S are masked only in a tile that reaches past S (warp-uniform); the
    // running max stays unscaled, and each weight is 2^(s * sl2 - m * sl2): one FFMA and one
    // MUFU.EX2 a score (rather than a multiply, a key test and a select before the max, then a
    // subtraction and exp2f's four instructions)
    if (key0 + NT * 8 > S) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (key0 + j * 8 + tq * 2 + (e & 1) >= S) sc[j][e] = -1e30f;
        }
    }
    float mx0 = r.m0, mx1 = r.m1;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        mx0 = fmaxf(mx0, fmaxf(sc[j][0], sc[j][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[j][2], sc[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // LAZY: the running max the weights are taken against moves only when a row's grows by more than
    // ATT_RESCALE_LOG2 in the exponent (weights then up to 2^8: float16 holds them as exactly as
    // below 1, the output and the sums are float32), and for the whole warp at once: a tile
    // whose rows stay within it (after the first tiles, most) skips the rescale's two
    // exponentials and its multiplies of the output accumulator. The result is the same softmax:
    // output and sum are taken against the same stale max and divided at the end.
    bool rescale = true;
    if constexpr (LAZY)
        rescale = __any_sync(0xffffffffu, (mx0 - r.m0) * sl2 > ATT_RESCALE_LOG2 ||
                                              (mx1 - r.m1) * sl2 > ATT_RESCALE_LOG2);
    if (rescale) {
        const float c0 = mrt_ex2((r.m0 - mx0) * sl2), c1 = mrt_ex2((r.m1 - mx1) * sl2);
        r.m0 = mx0;
        r.m1 = mx1;
        if constexpr (!ONES) {
            r.l0 *= c0;
            r.l1 *= c1;
        }
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
            r.o[j][0] *= c0;
            r.o[j][1] *= c0;
            r.o[j][2] *= c1;
            r.o[j][3] *= c1;
        }
    }
    const float b0 = r.m0 * sl2, b1 = r.m1 * sl2;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        sc[j][0] = mrt_ex2(fmaf(sc[j][0], sl2, -b0));
        sc[j][1] = mrt_ex2(fmaf(sc[j][1], sl2, -b0));
        sc[j][2] = mrt_ex2(fmaf(sc[j][2], sl2, -b1));
        sc[j][3] = mrt_ex2(fmaf(sc[j][3], sl2, -b1));
        if constexpr (!ONES) {
            ps0 += sc[j][0] + sc[j][1];
            ps1 += sc[j][2] + sc[j][3];
        }
    }
    if constexpr (!ONES) {
        r.l0 += ps0;
        r.l1 += ps1;
    }
}

// The 16 rows against NT * 8 keys (K rows at ks, V rows at vs, pitch DP + 8; key0 is the first
// key's index, keys from S on are masked). sl2 = scale * log2(e), positive: the running max is
// taken before scaling. When d is an odd multiple of 8 (d = 40 in DP = 48), the last 8
// dimensions of Q K^T are one m16n8k8 product and P V skips the output n-tile past d: no product
// of the zero padding. With ONES (d = DP - 8 at compile time, V's column d all ones) the row
// sums come from P V's last n-tile (column d) rather than from adding the weights up: a
// product of the tensor cores for every 16 keys instead of two adds a score.
//
// RT row tiles at once (att_step_rows: r[0 .. RT), one warp's 16·RT rows): each K and V fragment
// is loaded once for all of them — a 16-row tile takes two ldmatrix wavefronts of shared memory
// a tensor-core product, which on an H100 is more than the tensor cores' rate; two tiles one.
template <int DP, int NT, bool ONES, int RT, bool LAZY>
__device__ __forceinline__ void att_step_rows(AttRows<DP>* r, const half_bits* ks,
                                              const half_bits* vs, int key0, int S, int d,
                                              float sl2, int lane) {
    constexpr int P = DP + 8;
    const int mi = lane >> 3;
    const bool half_last = (d & 15) != 0;  // dims DP-16 .. DP-9 real, DP-8 .. DP-1 padding
    // S = Q K^T. ldmatrix x4 over two 8-key n-tiles: (j, dims lo), (j, dims hi), (j+1, lo),
    // (j+1, hi); K rows are the B operand's columns, so no transpose. A half chunk: x2 over
    // (j, lo), (j+1, lo).
    float sc[RT][NT][4];
#pragma unroll
    for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int j = 0; j < NT; ++j) sc[t][j][0] = sc[t][j][1] = sc[t][j][2] = sc[t][j][3] = 0.f;
    {
        const half_bits* kr = ks + ((mi >> 1) * 8 + (lane & 7)) * P + (mi & 1) * 8;
        const half_bits* kr2 = ks + ((mi & 1) * 8 + (lane & 7)) * P + (DP - 16);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
#pragma unroll
            for (int kc = 0; kc < DP / 16; ++kc) {
                unsigned b[4];
                if (kc == DP / 16 - 1 && half_last) {
                    mrt_ldmatrix_x2(b, kr2 + j * 8 * P);
#pragma unroll
                    for (int t = 0; t < RT; ++t) {
                        mrt_mma_m16n8k8(sc[t][j], r[t].qa[kc], b[0]);
                        mrt_mma_m16n8k8(sc[t][j + 1], r[t].qa[kc], b[1]);
                    }
                } else {
                    mrt_ldmatrix_x4(b, kr + j * 8 * P + kc * 16);
#pragma unroll
                    for (int t = 0; t < RT; ++t) {
                        mrt_mma_m16n8k16(sc[t][j], r[t].qa[kc], b[0], b[1]);
                        mrt_mma_m16n8k16(sc[t][j + 1], r[t].qa[kc], b[2], b[3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < RT; ++t)
        att_softmax<DP, NT, ONES, LAZY>(r[t], sc[t], key0, S, sl2, lane);
    // O += P V: P (16 x 16 keys per step) from the score registers as A fragments; V rows are the
    // B operand's k axis, so ldmatrix.trans: (keys lo, dims j), (keys hi, j), (lo, j+1), (hi, j+1);
    // the last n-tile alone (x2: its keys lo, hi) when the one after it is padding (and not the
    // row sums' column, ONES).
    const half_bits* vr = vs + ((mi & 1) * 8 + (lane & 7)) * P + (mi >> 1) * 8;
#pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc) {
        unsigned pa[RT][4];
#pragma unroll
        for (int t = 0; t < RT; ++t) {
            pa[t][0] = mrt_pack_h2(sc[t][2 * kc][0], sc[t][2 * kc][1]);
            pa[t][1] = mrt_pack_h2(sc[t][2 * kc][2], sc[t][2 * kc][3]);
            pa[t][2] = mrt_pack_h2(sc[t][2 * kc + 1][0], sc[t][2 * kc + 1][1]);
            pa[t][3] = mrt_pack_h2(sc[t][2 * kc + 1][2], sc[t][2 * kc + 1][3]);
        }
#pragma unroll
        for (int j = 0; j < DP / 8; j += 2) {
            unsigned b[4];
            if (j == DP / 8 - 2 && half_last && !ONES) {
                mrt_ldmatrix_x2_trans(b, vr + kc * 16 * P + j * 8);
#pragma unroll
                for (int t = 0; t < RT; ++t) mrt_mma_m16n8k16(r[t].o[j], pa[t], b[0], b[1]);
            } else {
                mrt_ldmatrix_x4_trans(b, vr + kc * 16 * P + j * 8);
#pragma unroll
                for (int t = 0; t < RT; ++t) {
                    mrt_mma_m16n8k16(r[t].o[j], pa[t], b[0], b[1]);
                    mrt_mma_m16n8k16(r[t].o[j + 1], pa[t], b[2], b[3]);
                }
            }
        }
    }
}

template <int DP, int NT, bool ONES>
__device__ __forceinline__ void att_step(AttRows<DP>& r, const half_bits* ks,
                                         const half_bits* vs, int key0, int S, int d, float sl2,
                                         int lane) {
    att_step_rows<DP, NT, ONES, 1, false>(&r, ks, vs, key0, S, d, sl2, lane);
}

// Normalise and store rows row0.. (those below L) at y (row stride C, the head's first column).
// The row sums: the quad's partial sums added, or with ONES column d of the output (the quad's
// first lane holds it).
template <int DP, bool ONES>
__device__ __forceinline__ void att_store(AttRows<DP>& r, half_bits* y, i64 C, int row0, int L,
                                          int d, int lane) {
    const int grp = lane >> 2, tq = lane & 3;
    float l0, l1;
    if constexpr (ONES) {
        l0 = __shfl_sync(0xffffffffu, r.o[DP / 8 - 1][0], lane & ~3);
        l1 = __shfl_sync(0xffffffffu, r.o[DP / 8 - 1][2], lane & ~3);
    } else {
        l0 = r.l0;
        l1 = r.l1;
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    }
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const int ra = row0 + grp, rb = ra + 8;
    unsigned* ya = (unsigned*)(y + (i64)ra * C);
    unsigned* yb = (unsigned*)(y + (i64)rb * C);
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
        const int col = j * 8 + tq * 2;
        if (col < d) {
            if (ra < L) ya[col / 2] = mrt_pack_h2(r.o[j][0] * i0, r.o[j][1] * i0);
            if (rb < L) yb[col / 2] = mrt_pack_h2(r.o[j][2] * i1, r.o[j][3] * i1);
        }
    }
}

// grid (ceil(L / 128), H, N), 256 / RT threads: ATT_WARPS / RT warps of RT 16-row tiles (RT = 2,
// attention_tiled2: two tiles a warp that share every K and V fragment load, att_step_rows — half
// the shared-memory wavefronts a tensor-core product, one rather than two, for more registers a
// thread); dynamic shared memory 4 * 64 * (DP + 8) * 2 bytes: two stages of [K tile; V tile], the
// second first holding the block's 128 Q rows.
#define ATT2_WARPS (ATT_WARPS / 2)
template <int DP, bool ONES, int RT = 1>
__device__ void attention_tiled(const half_bits* __restrict__ q, const half_bits* __restrict__ k,
                                const half_bits* __restrict__ v, half_bits* __restrict__ y,
                                int L, int S, int heads, int d, int ldq, int ldkv, int ns,
                                float scale) {
    constexpr int P = DP + 8, NT = ATT_WARPS / RT * 32, ROWS = ATT_WARPS * 16;
    MRT_DYN_SMEM(half_bits, sm);
    half_bits* st0 = sm;
    half_bits* st1 = sm + 2 * ATT_KEYS * P;
    const int n = blockIdx.z, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 C = (i64)heads * d;
    const int row0 = blockIdx.x * ROWS;
    // token strides (rows of ns sequences interleaved)
    const i64 tq = (i64)ldq * ns, tkv = (i64)ldkv * ns;
    const half_bits* kg = k + att_seq_row(n, S, ns) * ldkv + (i64)h * d;
    const half_bits* vg = v + att_seq_row(n, S, ns) * ldkv + (i64)h * d;
    att_zero_cols<DP, ONES>(sm, 4 * ATT_KEYS, d, tid, NT, ATT_KEYS, 2);
    att_load_rows<DP, ONES, ROWS, NT>(st1, q + att_seq_row(n, L, ns) * ldq + row0 * tq + (i64)h * d,
                                      tq, min(L - row0, ROWS), d, tid);
    att_load_kv_tile<DP, ONES, NT>(st0, kg, vg, tkv, min(S, ATT_KEYS), d, tid);
    mrt_cp_async_commit();
    mrt_cp_async_wait<0>();
    __syncthreads();
    AttRows<DP> r[RT];
#pragma unroll
    for (int i = 0; i < RT; ++i) att_begin<DP>(r[i], st1 + (warp * RT + i) * 16 * P, lane);
    __syncthreads();  // Q is in registers: stage 1 may take K/V
    const float sl2 = scale * 1.4426950408889634f;
    const int tiles = (S + ATT_KEYS - 1) / ATT_KEYS;
    for (int t = 0; t < tiles; ++t) {
        half_bits* cur = (t & 1) ? st1 : st0;
        if (t + 1 < tiles) {
            half_bits* nxt = (t & 1) ? st0 : st1;
            const int s1 = (t + 1) * ATT_KEYS;
            att_load_kv_tile<DP, ONES, NT>(nxt, kg + s1 * tkv, vg + s1 * tkv, tkv,
                                           min(S - s1, ATT_KEYS), d, tid);
            mrt_cp_async_commit();
            mrt_cp_async_wait<1>();
        } else {
            mrt_cp_async_wait<0>();
        }
        __syncthreads();
        att_step_rows<DP, ATT_KEYS / 8, ONES, RT, true>(r, cur, cur + ATT_KEYS * P, t * ATT_KEYS,
                                                        S, d, sl2, lane);
        __syncthreads();  // this stage is reloaded next iteration
    }
    half_bits* yh = y + att_seq_row(n, L, ns) * C + (i64)h * d;
#pragma unroll
    for (int i = 0; i < RT; ++i)
        att_store<DP, ONES>(r[i], yh, C * ns, row0 + (warp * RT + i) * 16, L, d, lane);
}

// grid (ceil(N * H / 4)), 128 threads; each warp one (sequence, head) with L <= 16 * MT query
// rows, keys in tiles of 16 * MT. Dynamic shared memory 4 * 3 * 16 * MT * (DP + 8) * 2 bytes:
// per warp [Q; K tile; V tile].
template <int DP, int MT, bool ONES>
__device__ void attention_short(const half_bits* __restrict__ q, const half_bits* __restrict__ k,
                                const half_bits* __restrict__ v, half_bits* __restrict__ y,
                                int N, int L, int S, int heads, int d, int ldq, int ldkv,
                                int ns, float scale) {
    constexpr int P = DP + 8, R = 16 * MT;
    MRT_DYN_SMEM(half_bits, sm);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int task = blockIdx.x * ATT_SHORT_WARPS + warp;
    if (task >= N * heads) return;
    const int n = task / heads, h = task % heads;
    half_bits* qs = sm + warp * 3 * R * P;
    half_bits* ks = qs + R * P;
    half_bits* vs = ks + R * P;
    att_zero_cols<DP, ONES>(qs, 3 * R, d, lane, 32, R, 3);
    att_load_rows<DP, ONES, R, 32>(qs, q + att_seq_row(n, L, ns) * ldq + (i64)h * d,
                                   (i64)ldq * ns, min(L, R), d, lane);
    const float sl2 = scale * 1.4426950408889634f;
    // one 16-row tile at a time (two tiles' registers at once would spill at DP >= 128); with a
    // single key tile (S <= R, attention over frames) K and V are loaded once for both
    const bool one_tile = S <= R;
    for (int m = 0; m < MT; ++m) {
        AttRows<DP> r;
        for (int s0 = 0; s0 < S; s0 += R) {
            if (m == 0 || !one_tile) {
                // the tile's first K/V element, from the launch indices and parameters rather
                // than addresses live across the loop (registers are short at DP = 160)
                const int t2 = blockIdx.x * ATT_SHORT_WARPS + (threadIdx.x >> 5);
                const i64 at = (att_seq_row(t2 / heads, S, ns) + (i64)s0 * ns) * ldkv +
                               (i64)(t2 % heads) * d;
                const i64 tkv = (i64)ldkv * ns;  // token stride (ns sequences interleaved)
                // K and V one at a time (both at once spill registers at DP = 96, MT = 2)
                att_load_rows<DP, ONES, R, 32>(ks, k + at, tkv, min(S - s0, R), d, lane);
                att_load_rows<DP, ONES, R, 32>(vs, v + at, tkv, min(S - s0, R), d, lane);
                mrt_cp_async_commit();
                mrt_cp_async_wait<0>();
                __syncwarp();
            }
            if (s0 == 0) att_begin<DP>(r, qs + m * 16 * P, lane);
            att_step<DP, 2 * MT, ONES>(r, ks, vs, s0, S, d, sl2, lane);
            __syncwarp();  // the tiles may be reloaded next
        }
        const i64 C = (i64)heads * d;
        // (n, h) again from the launch indices, rather than live across the loop
        const int t2 = blockIdx.x * ATT_SHORT_WARPS + (threadIdx.x >> 5);
        att_store<DP, ONES>(r, y + att_seq_row(t2 / heads, L, ns) * C + (i64)(t2 % heads) * d,
                            C * ns, m * 16, L, d, lane);
        // the lanes meet again after the divergent stores, before the next tile's aligned
        // ldmatrix/mma (reconvergence is not otherwise guaranteed since Volta)
        __syncwarp();
    }
}

// The short kernels' register budget, as blocks an SM for __launch_bounds__: as many as ptxas's
// own register choice allowed before this budget (7 at DP = 16, 6 at 32, 5 at 48 with 16-row
// tiles, 4 up to 96, 3 above), or fewer where shared memory (4 warps x 3 x 16 * MT rows of DP + 8
// halves, and 1 KiB the SM reserves a block; 228 KiB an SM on sm_90, 164 KiB on sm_80) allows
// fewer anyway. Left to itself, ptxas aims at a register count just under an occupancy step and,
// for some head sizes, spilled a few bytes to reach it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ATT_SM_SMEM (164 * 1024)
#else
#define ATT_SM_SMEM (228 * 1024)
#endif
#define ATT_SHORT_SMEM_BLOCKS(DP, MT) (ATT_SM_SMEM / (384 * (MT) * ((DP) + 8) + 1024))
#define ATT_SHORT_REG_BLOCKS(DP, MT) \
    ((DP) <= 16 ? 7 : (DP) <= 32 ? 6 : (DP) <= 48 && (MT) == 1 ? 5 : (DP) <= 96 ? 4 : 3)
#define ATT_SHORT_MIN_BLOCKS(DP, MT)                            \
    (ATT_SHORT_SMEM_BLOCKS(DP, MT) < ATT_SHORT_REG_BLOCKS(DP, MT) \
         ? ATT_SHORT_SMEM_BLOCKS(DP, MT)                        \
         : ATT_SHORT_REG_BLOCKS(DP, MT))

// The tiled kernel's register budget, as blocks an SM: two (128 registers a thread) up to DP = 64,
// one above (ptxas's own choice there was 133 or more). Left to itself, ptxas squeezed some head
// sizes just under an occupancy step on one architecture and spilled to do so (DP = 80 on sm_80,
// 20 bytes, once the softmax's rescale became conditional), or not (DP = 64 took 130 registers
// on sm_90: one block). DP = 16 had three blocks (68 registers) before the conditional rescale;
// three now spill on sm_80.
#define ATT_TILED_MIN_BLOCKS(DP) ((DP) <= 64 ? 2 : 1)

// The three entries of one head-size suffix SUF: the DP kernels with head size DARG (`d`, the
// kernel argument; or a literal, see below); ONES: V's first padding column holds ones (a
// literal d = DP - 8 only).
#define ATT_ENTRIES_AS(SUF, DP, DARG, ONES)                                                        \
    extern "C" __global__ void __launch_bounds__(256, ATT_TILED_MIN_BLOCKS(DP))                    \
        attention_tiled_f16_d##SUF(const half_bits* q, const half_bits* k, const half_bits* v,     \
                                   half_bits* y, int L, int S, int heads, int d, int ldq,          \
                                   int ldkv, int ns, float scale) {                                \
        attention_tiled<DP, ONES>(q, k, v, y, L, S, heads, DARG, ldq, ldkv, ns, scale);            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128, ATT_SHORT_MIN_BLOCKS(DP, 1))                 \
        attention_short1_f16_d##SUF(const half_bits* q, const half_bits* k, const half_bits* v,    \
                                     half_bits* y, int N, int L, int S, int heads, int d, int ldq, \
                                     int ldkv, int ns, float scale) {                              \
        attention_short<DP, 1, ONES>(q, k, v, y, N, L, S, heads, DARG, ldq, ldkv, ns, scale);      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128, ATT_SHORT_MIN_BLOCKS(DP, 2))                 \
        attention_short2_f16_d##SUF(const half_bits* q, const half_bits* k, const half_bits* v,    \
                                     half_bits* y, int N, int L, int S, int heads, int d, int ldq, \
                                     int ldkv, int ns, float scale) {                              \
        attention_short<DP, 2, ONES>(q, k, v, y, N, L, S, heads, DARG, ldq, ldkv, ns, scale);      \
    }
#define ATT_ENTRIES(DP) ATT_ENTRIES_AS(DP, DP, d, false)
ATT_ENTRIES(16)
ATT_ENTRIES(32)
ATT_ENTRIES(48)
ATT_ENTRIES(64)
ATT_ENTRIES(80)
ATT_ENTRIES(96)
ATT_ENTRIES(128)
ATT_ENTRIES(160)

// Entries for one head size (not a multiple of 16) with d a compile-time constant (the launcher
// passes the same value): the choice between the m16n8k16 and m16n8k8 paths, the padding and the
// row loads fold away, where the DP entries issue both paths' instructions under predicates,
// and V's first padding column holds ones for the row sums (ONES). Only d = 40, SD1.5's 64x64
// level (its self-, cross- and motion-module attentions); the launcher takes them for d = 40.
ATT_ENTRIES_AS(40, 48, 40, true)

// The two-tile tiled kernel (attention_tiled<.., 2>) for d = 40, SD1.5's 64x64 level, whose
// 4096-token self-attention is the UNet's largest: the engine times it against
// attention_tiled_f16_d40 when it builds (TacticCache.attention).
extern "C" __global__ void __launch_bounds__(ATT2_WARPS * 32) attention_tiled2_f16_d40(
    const half_bits* q, const half_bits* k, const half_bits* v, half_bits* y, int L, int S,
    int heads, int d, int ldq, int ldkv, int ns, float scale) {
    attention_tiled<48, true, 2>(q, k, v, y, L, S, heads, 40, ldq, ldkv, ns, scale);
}

// ---------------------------------------------------------------------------------------------
// Channels-last float16 convolution as an implicit GEMM on the tensor cores (a tactic timed
// against cuDNN's algorithms when the engine is built; exec.rs): y[m, o] = sum_k A[m, k] W[o, k]
// + bias[o] + sbias[n, o] + res[m, o], m = (n, oh, ow) an output pixel, k = (kh, kw, c) — the
// filter's [O, kh, kw, C] layout, so W is the cuDNN NHWC weight as uploaded — and A[m, k] the
// input pixel (oh * sh - ph + kh, ow * sw - pw + kw) of image n, channel c (zero outside the
// image). x [N, H, W, C], y and res [N, OH, OW, O]; bias [O], sbias [N, O], each optional.
// Needs C % 32 == 0 (a 32-wide k tile within one filter tap), O % 8 == 0 and KH * KW <= 32;
// dilation 1, one group (launch.rs checks). Block tile 128 pixels x BN output channels (64 or
// 128: `conv_igemm_f16_nBN`), k tiles of 32 in three cp.async stages; 4 warps of 64 x BN / 2
// (4 x BN / 16 m16n8k16 products a 16-wide k step; a warp whose channels all lie past O skips
// them); shared rows of 40 halves (5 chunks: conflict-free ldmatrix). Grid (ceil(M / 128),
// ceil(O / BN)), 128 threads, dynamic shared memory 3 * (128 + BN) * 40 * 2 bytes.
//
// GG: the same kernel as a GEMM with GEGLU in its epilogue (`gemm_geglu_f16_nBN`): a 1x1
// "convolution" of M = rows pixels (N = 1, H = OH = M, W = OW = 1), C = k, weight [2D, k] (the
// projection's `[value; gate]` rows), O = 2D. The block's channel o reads weight row j
// (o / 16 * 8 + o % 8) of the value half when o / 8 is even and of the gate half (D + j) when
// odd, so each thread holds a value and its gate in the same accumulator slots of n8 tiles
// 2t and 2t + 1: y[m, j] = (v + bias[j]) * gelu(g + bias[D + j]) for two adjacent j, stored
// as one 4-byte pair; y is [M, D], no per-sample bias or residual. Needs D % 8 == 0.
//
// GN: the convolution of a GroupNorm's output computed from the GroupNorm's input
// (`conv_igemm_gn_f16_nBN`): x is the un-normalised input, and each thread, once its own A chunks
// of a k tile are in shared memory, turns every in-image one into silu?(x * a + b) with the
// per-(sample, channel) coefficients ab[(n * C + c) * 2 + {0, 1}] of group_norm_nhwc_coeffs
// (rounded to float16 once, as group_norm_nhwc_apply's output is), before the block's barrier;
// the zero padding outside the image stays zero (the convolution pads the normalised values).
// So the normalised tensor is never written or read.
//
// LN: the same for a LayerNorm's output (`conv_igemm_ln_f16_nBN`, as a GEMM: a 1x1 convolution of
// one image of M x 1 pixels, C = the rows' width): each A chunk of row m becomes
// (x * rs[2m] + rs[2m + 1]) * gamma[c] + beta[c] (beta optional) with the row's inverse
// deviation and its negated mean times it from layer_norm_stats.
#define CIG_BM 128
#define CIG_BK 32
#define CIG_ST 3
#define CIG_P (CIG_BK + 8)

// GN: silu?(v * a + b) of the 8 float16 channels at s (16 bytes of shared memory) in place, the
// coefficients of channel k at cf[2k], cf[2k + 1]
__device__ __forceinline__ void cig_gn_chunk(half_bits* s, const float* cf, int silu) {
    float v[8];
    load16(v, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        v[k] = v[k] * cf[2 * k] + cf[2 * k + 1];
        if (silu) v[k] = v[k] * sigmoidf(v[k]);
    }
    store16(s, v);
}

// GN: the 16 coefficients of 8 channels (64 bytes, 16-byte aligned: c a multiple of 8)
__device__ __forceinline__ void cig_gn_coeffs(float* cf, const float* ab) {
#pragma unroll
    for (int q = 0; q < 4; ++q) load16(cf + 4 * q, ab + 4 * q);
}

// LN: (v * r[0] + r[1]) * g[k] + b[k] of the 8 float16 channels at s in place
__device__ __forceinline__ void cig_ln_chunk(half_bits* s, const float* r, const float* g,
                                             const float* b) {
    float v[8];
    load16(v, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (v[k] * r[0] + r[1]) * g[k] + b[k];
    store16(s, v);
}

template <int BN, bool GG, bool GN, bool LN = false>
__device__ __forceinline__ void conv_igemm(
    const half_bits* __restrict__ x, const half_bits* __restrict__ w, half_bits* __restrict__ y,
    const half_bits* __restrict__ bias, const half_bits* __restrict__ sbias,
    const half_bits* __restrict__ res, const float* __restrict__ ab, int silu, int N, int H,
    int W, int C, int OH, int OW, int O, int KH, int KW, int sh, int sw, int ph, int pw,
    const half_bits* __restrict__ lg = nullptr, const half_bits* __restrict__ lb = nullptr) {
    constexpr int NB = BN / 32;  // W rows a thread loads a tile
    constexpr int NJ = BN / 16;  // n8 tiles a warp
    MRT_DYN_SMEM(half_bits, sm);
    half_bits* as = sm;                            // [ST][BM][P]
    half_bits* bs = sm + CIG_ST * CIG_BM * CIG_P;  // [ST][BN][P]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int OHW = OH * OW, M = N * OHW, K = KH * KW * C, KT = K / CIG_BK;
    const int m0 = blockIdx.x * CIG_BM, n0 = blockIdx.y * BN;
    // this thread's load slots, the same in every k tile: chunk ch (8 channels) of A rows
    // r0 + 32 i (i < 4) and of W rows r0 + 32 i (i < NB), r0 = 8 warp + lane % 8, ch = lane / 8:
    // a quarter warp (the phase of a 16-byte shared access) writes one chunk of 8 consecutive
    // rows, 80 bytes apart, so in distinct banks (two rows' 4 chunks a quarter warp, as lane / 4
    // and lane % 4 would give, put chunk 0 of the second row in the first's banks 0-3: twice the
    // wavefronts for every cp.async, and for the GN/LN chunks' loads and stores); a warp still
    // reads 8 whole 64-byte row pieces of global memory. An A row's address at filter tap (0, 0)
    // and which taps fall inside the image (bit kh * KW + kw; none past M) are computed once; a
    // k tile then adds one offset common to every row.
    const int ch = (tid >> 3) & 3, r0 = (tid & 7) | ((tid >> 5) << 3);
    const half_bits* ap[4];
    unsigned taps[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + r0 + 32 * i;
        const int n = m / OHW, p = m - n * OHW, oh = p / OW, ow = p - oh * OW;
        const int ih = oh * sh - ph, iw = ow * sw - pw;
        ap[i] = x + (((i64)n * H + ih) * W + iw) * C + ch * 8;
        unsigned t = 0;
        if (m < M)
            for (int a = 0; a < KH; ++a)
                for (int b = 0; b < KW; ++b)
                    if (ih + a >= 0 && ih + a < H && iw + b >= 0 && iw + b < W)
                        t |= 1u << (a * KW + b);
        taps[i] = t;
    }
    const half_bits* bp[NB];
#pragma unroll
    for (int i = 0; i < NB; ++i) {
        const int o = n0 + r0 + 32 * i;
        // GG: value row j or gate row D + j (see above)
        const int row = GG ? ((o >> 3) & 1) * (O >> 1) + (o >> 4) * 8 + (o & 7) : o;
        bp[i] = o < O ? w + (i64)row * K + ch * 8 : nullptr;
    }
    // the next k tile to load: its first k, that k's filter tap (kh * KW + kw), kw and channel,
    // and its input offset from tap (0, 0): (kh * W + kw) * C + c, stepped along (32 a tile, and
    // (W - KW) * C more where a filter row ends)
    int lk = 0, tap = 0, lkw = 0, lc = 0;
    i64 off = 0;
    auto load = [&](int stage) {
        half_bits* a = as + stage * CIG_BM * CIG_P;
        half_bits* b = bs + stage * BN * CIG_P;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            half_bits* s = a + (r0 + 32 * i) * CIG_P + ch * 8;
            if ((taps[i] >> tap) & 1u) {
                mrt_cp_async_16(s, ap[i] + off);
            } else {
                unsigned* z = (unsigned*)s;
                z[0] = z[1] = z[2] = z[3] = 0u;
            }
        }
#pragma unroll
        for (int i = 0; i < NB; ++i) {
            half_bits* s = b + (r0 + 32 * i) * CIG_P + ch * 8;
            if (bp[i]) {
                mrt_cp_async_16(s, bp[i] + lk);
            } else {
                unsigned* z = (unsigned*)s;
                z[0] = z[1] = z[2] = z[3] = 0u;
            }
        }
        lk += CIG_BK;
        lc += CIG_BK;
        off += CIG_BK;
        if (lc == C) {
            lc = 0;
            ++tap;
            if (++lkw == KW) {
                lkw = 0;
                off += (i64)(W - KW) * C;
            }
        }
    };
#pragma unroll
    for (int s = 0; s < CIG_ST - 1; ++s) {
        if (s < KT) load(s);
        mrt_cp_async_commit();
    }
    const int wm = (warp & 1) * 64, wn = (warp >> 1) * (BN / 2);
    const bool active = n0 + wn < O;  // warp-uniform: its channels reach into O
    float acc[4][NJ][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    // ldmatrix rows of this lane: A (m16 x k16: rows lane % 16, k 8 (lane / 16)); W (two n8
    // tiles x k16: n rows (lane / 16) * 8 + lane % 8, k 8 ((lane / 8) % 2))
    const int a_off = (wm + (lane & 15)) * CIG_P + (lane >> 4) * 8;
    const int b_off = (wn + (lane >> 4) * 8 + (lane & 7)) * CIG_P + ((lane >> 3) & 1) * 8;
    // the stage read this tile and the one loaded (tiles kt and kt + 2)
    int rs = 0, ws = CIG_ST - 1;
    // GN: tile kt's filter tap and first channel; the sample of this thread's first A row and
    // whether its four rows share it (rows past M take the last row's: they stay zero)
    int gtap = 0, gc = 0;
    const int gn0 = GN ? min(m0 + r0, M - 1) / OHW : 0;
    const bool guni = !GN || gn0 == min(m0 + r0 + 96, M - 1) / OHW;
    // LN: the statistics of this thread's four A rows (ab holds them by row; rows past M none)
    float lrs[4][2];
    if (LN) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = min(m0 + r0 + 32 * i, M - 1);
            lrs[i][0] = ab[2 * (i64)m];
            lrs[i][1] = ab[2 * (i64)m + 1];
        }
    }
    for (int kt = 0; kt < KT; ++kt) {
        float cf[16];
        if (GN && guni) cig_gn_coeffs(cf, ab + ((i64)gn0 * C + gc + ch * 8) * 2);
        if (LN) {
            load16(cf, lg + gc + ch * 8);
            if (lb) {
                load16(cf + 8, lb + gc + ch * 8);
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) cf[8 + k] = 0.f;
            }
        }
        mrt_cp_async_wait<CIG_ST - 2>();
        if (LN) {
            half_bits* a = as + rs * CIG_BM * CIG_P + r0 * CIG_P + ch * 8;
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if ((taps[i] >> gtap) & 1u) cig_ln_chunk(a + 32 * i * CIG_P, lrs[i], cf, cf + 8);
            gc += CIG_BK;
            if (gc == C) {
                gc = 0;
                ++gtap;
            }
        }
        if (GN) {
            // this thread's own chunks of tile kt are in (its cp.async groups up to kt are done)
            half_bits* a = as + rs * CIG_BM * CIG_P + r0 * CIG_P + ch * 8;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (!((taps[i] >> gtap) & 1u)) continue;
                if (!guni)
                    cig_gn_coeffs(cf, ab + ((i64)((m0 + r0 + 32 * i) / OHW) * C + gc + ch * 8) * 2);
                cig_gn_chunk(a + 32 * i * CIG_P, cf, silu);
            }
            gc += CIG_BK;
            if (gc == C) {
                gc = 0;
                ++gtap;
            }
        }
        __syncthreads();  // tile kt is in; every warp is done with the stage loaded next
        if (kt + CIG_ST - 1 < KT) load(ws);
        mrt_cp_async_commit();
        const half_bits* a = as + rs * CIG_BM * CIG_P + a_off;
        const half_bits* b = bs + rs * BN * CIG_P + b_off;
        rs = rs == CIG_ST - 1 ? 0 : rs + 1;
        ws = ws == CIG_ST - 1 ? 0 : ws + 1;
        if (!active) continue;
#pragma unroll
        for (int kk = 0; kk < CIG_BK; kk += 16) {
            unsigned af[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) mrt_ldmatrix_x4(af[i], a + i * 16 * CIG_P + kk);
#pragma unroll
            for (int j = 0; j < NJ; j += 2) {
                unsigned bf[4];
                mrt_ldmatrix_x4(bf, b + j * 8 * CIG_P + kk);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    mrt_mma_m16n8k16(acc[i][j], af[i], bf[0], bf[1]);
                    mrt_mma_m16n8k16(acc[i][j + 1], af[i], bf[2], bf[3]);
                }
            }
        }
    }
    mrt_cp_async_wait_all();
    if (!active) return;
    // epilogue: rows m0 + wm + 16 i + lane / 4 (+ 8), columns n0 + wn + 8 j + 2 (lane % 4) (+ 1)
    const int grp = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            const int m = m0 + wm + 16 * i + grp + 8 * hi;
            if (m >= M) continue;
            if (GG) {
                // n8 tiles j (values) and j + 1 (their gates): output channels jo, jo + 1
                const int D = O >> 1;
#pragma unroll
                for (int j = 0; j < NJ; j += 2) {
                    const int o = n0 + wn + 8 * j;
                    if (o >= O) continue;
                    const int jo = (o >> 4) * 8 + 2 * tq;
                    float a0 = acc[i][j][2 * hi], a1 = acc[i][j][2 * hi + 1];
                    float g0 = acc[i][j + 1][2 * hi], g1 = acc[i][j + 1][2 * hi + 1];
                    if (bias) {
                        const unsigned ub = *(const unsigned*)(bias + jo);
                        const unsigned ug = *(const unsigned*)(bias + D + jo);
                        a0 += mrt_h2f((half_bits)(ub & 0xffffu));
                        a1 += mrt_h2f((half_bits)(ub >> 16));
                        g0 += mrt_h2f((half_bits)(ug & 0xffffu));
                        g1 += mrt_h2f((half_bits)(ug >> 16));
                    }
                    *(unsigned*)(y + (i64)m * D + jo) =
                        mrt_pack_h2(geglu1(a0, g0), geglu1(a1, g1));
                }
                continue;
            }
            const int n = m / OHW;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const int o = n0 + wn + 8 * j + 2 * tq;
                if (o >= O) continue;
                float v0 = acc[i][j][2 * hi], v1 = acc[i][j][2 * hi + 1];
                // channel pairs: 4-byte loads (o and O even)
                auto add2 = [&](const half_bits* p) {
                    const unsigned u = *(const unsigned*)p;
                    v0 += mrt_h2f((half_bits)(u & 0xffffu));
                    v1 += mrt_h2f((half_bits)(u >> 16));
                };
                if (bias) add2(bias + o);
                if (sbias) add2(sbias + (i64)n * O + o);
                if (res) add2(res + (i64)m * O + o);
                *(unsigned*)(y + (i64)m * O + o) = mrt_pack_h2(v0, v1);
            }
        }
    }
}

#define CONV_IGEMM_ENTRY(BN)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) conv_igemm_f16_n##BN(                        \
        const half_bits* x, const half_bits* w, half_bits* y, const half_bits* bias,               \
        const half_bits* sbias, const half_bits* res, int N, int H, int W, int C, int OH, int OW,  \
        int O, int KH, int KW, int sh, int sw, int ph, int pw) {                                   \
        conv_igemm<BN, false, false>(x, w, y, bias, sbias, res, nullptr, 0, N, H, W, C, OH, OW, O,   \
                                     KH, KW, sh, sw, ph, pw);                                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) conv_igemm_gn_f16_n##BN(                     \
        const half_bits* x, const half_bits* w, half_bits* y, const half_bits* bias,               \
        const half_bits* sbias, const half_bits* res, const float* ab, int silu, int N, int H,     \
        int W, int C, int OH, int OW, int O, int KH, int KW, int sh, int sw, int ph, int pw) {     \
        conv_igemm<BN, false, true>(x, w, y, bias, sbias, res, ab, silu, N, H, W, C, OH, OW, O,    \
                                    KH, KW, sh, sw, ph, pw);                                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) conv_igemm_ln_f16_n##BN(                     \
        const half_bits* x, const half_bits* w, half_bits* y, const half_bits* bias,               \
        const half_bits* sbias, const half_bits* res, const float* rs, const half_bits* gamma,     \
        const half_bits* beta, int N, int H, int W, int C, int OH, int OW, int O, int KH, int KW,  \
        int sh, int sw, int ph, int pw) {                                                          \
        conv_igemm<BN, false, false, true>(x, w, y, bias, sbias, res, rs, 0, N, H, W, C, OH, OW,   \
                                           O, KH, KW, sh, sw, ph, pw, gamma, beta);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) gemm_geglu_f16_n##BN(                        \
        const half_bits* x, const half_bits* w, half_bits* y, const half_bits* bias, int M, int K,  \
        int D) {                                                                                   \
        conv_igemm<BN, true, false>(x, w, y, bias, nullptr, nullptr, nullptr, 0, 1, M, 1, K, M, 1, \
                                    2 * D, 1, 1, 1, 1, 0, 0);                                      \
    }
CONV_IGEMM_ENTRY(64)
CONV_IGEMM_ENTRY(128)
