//! Winograd F(2×2, 3×3) convolution transforms for 3×3, stride-1, padding-1 convolutions.
//!
//! A 3×3 convolution of an `[N, C, H, W]` input is computed on 4×4 input tiles (stride 2) that
//! each give a 2×2 output tile:
//!
//! ```text
//! V[k, c, t]   = (Bᵀ d B)[k]      d: the 4×4 input tile t of channel c (zero padded)
//! U[k, o, c]   = (G g Gᵀ)[k]      g: the 3×3 kernel of output o, input c
//! M[k]         = U[k] · V[k]      16 independent GEMMs [O × C] · [C × T]
//! Y tile       = Aᵀ m A + bias    m: the 16 values M[·, o, t]
//! ```
//!
//! 16 multiplies per 2×2 outputs and input channel instead of 36: 2.25× less arithmetic than a
//! direct convolution, and the GEMMs are large and regular. The transforms here are the two
//! memory-bound passes around the GEMMs ([`input_transform`], [`output_transform`]); the GEMM
//! itself is left to the runtime (ONNX Runtime's batched MatMul), and [`weight_transform`] is
//! what the exporter applies once, storing the result as `{weight}@winograd` `[16, O, C]`.
//!
//! Tiles are numbered `t = (n·Th + ty)·Tw + tx` with `Th = ⌈H/2⌉`, `Tw = ⌈W/2⌉`; odd sizes are
//! padded with zeros on the bottom/right and the extra output row/column is dropped.
//!
//! Numerics: the transforms only add and subtract (Bᵀ, Aᵀ) or halve (G), so the result differs
//! from a direct convolution by float32 rounding of sums with a few more terms.

use crate::KernelError;

fn shape(op: &'static str, what: String) -> KernelError {
    KernelError::Shape { op, what }
}

/// `G` of F(2×2, 3×3): the kernel transform.
pub const G: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// Tile counts `(Th, Tw)` of an `H × W` plane.
pub fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// `U = G g Gᵀ` for a PyTorch `[O, C, 3, 3]` weight, laid out `[16, O, C]`.
pub fn weight_transform(w: &[f32], o: usize, c: usize) -> Result<Vec<f32>, KernelError> {
    if w.len() != o * c * 9 {
        return Err(shape(
            "WinogradWeight",
            format!(
                "weight has {} values, [{o}, {c}, 3, 3] needs {}",
                w.len(),
                o * c * 9
            ),
        ));
    }
    let mut u = vec![0f32; 16 * o * c];
    for oc in 0..o * c {
        let g = &w[oc * 9..oc * 9 + 9];
        // Gg: [4, 3]
        let mut gg = [[0f32; 3]; 4];
        for (i, row) in gg.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|r| G[i][r] * g[r * 3 + j]).sum();
            }
        }
        for i in 0..4 {
            for j in 0..4 {
                let v: f32 = (0..3).map(|r| gg[i][r] * G[j][r]).sum();
                u[(i * 4 + j) * o * c + oc] = v;
            }
        }
    }
    Ok(u)
}

/// Split `0..n` into at most `threads` contiguous ranges and run `f` on each in parallel.
fn parallel_ranges(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    if threads <= 1 {
        f(0..n);
        return;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for i in 1..threads {
            let lo = (i * per).min(n);
            let hi = ((i + 1) * per).min(n);
            let f = &f;
            s.spawn(move || f(lo..hi));
        }
        f(0..per.min(n));
    });
}

/// A raw pointer that threads writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `V = Bᵀ d B` for every 4×4 tile of `x = [N, C, H, W]`; `v` is `[16, C, T]`.
pub fn input_transform(
    x: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    v: &mut [f32],
) -> Result<(), KernelError> {
    let (th, tw) = tiles(h, w);
    let t_all = n * th * tw;
    if x.len() != n * c * h * w {
        return Err(shape(
            "WinogradInput",
            format!(
                "input has {} values, [{n}, {c}, {h}, {w}] needs {}",
                x.len(),
                n * c * h * w
            ),
        ));
    }
    if v.len() != 16 * c * t_all {
        return Err(shape(
            "WinogradInput",
            format!(
                "tile buffer has {} values, [16, {c}, {t_all}] needs {}",
                v.len(),
                16 * c * t_all
            ),
        ));
    }
    if t_all == 0 || c == 0 {
        return Ok(());
    }
    let out = SharedMut(v.as_mut_ptr());
    let pw = 2 * tw + 2; // padded row length
    parallel_ranges(c, |chans| {
        // the four padded input rows of a tile row, their row transform, and its even/odd split
        let mut rows = vec![0f32; 4 * pw];
        let mut tr = vec![0f32; 4 * pw];
        let mut even = vec![0f32; 4 * (tw + 1)];
        let mut odd = vec![0f32; 4 * (tw + 1)];
        for ch in chans {
            for img in 0..n {
                let plane = &x[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
                for ty in 0..th {
                    for r in 0..4 {
                        let row = &mut rows[r * pw..(r + 1) * pw];
                        row.fill(0.0);
                        let y = (2 * ty + r) as isize - 1;
                        if y >= 0 && (y as usize) < h {
                            let y = y as usize;
                            row[1..1 + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                        }
                    }
                    // Bᵀ d over rows: t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3
                    {
                        let (d0, rest) = rows.split_at(pw);
                        let (d1, rest) = rest.split_at(pw);
                        let (d2, d3) = rest.split_at(pw);
                        let (t0, rest) = tr.split_at_mut(pw);
                        let (t1, rest) = rest.split_at_mut(pw);
                        let (t2, t3) = rest.split_at_mut(pw);
                        for p in 0..pw {
                            t0[p] = d0[p] - d2[p];
                            t1[p] = d1[p] + d2[p];
                            t2[p] = d2[p] - d1[p];
                            t3[p] = d1[p] - d3[p];
                        }
                    }
                    for i in 0..4 {
                        let t = &tr[i * pw..(i + 1) * pw];
                        let e = &mut even[i * (tw + 1)..(i + 1) * (tw + 1)];
                        let o = &mut odd[i * (tw + 1)..(i + 1) * (tw + 1)];
                        for j in 0..=tw {
                            e[j] = t[2 * j];
                            o[j] = t[2 * j + 1];
                        }
                    }
                    // (Bᵀ d) B over columns of tile tx: padded columns 2tx .. 2tx+3
                    let base = (img * th + ty) * tw;
                    for i in 0..4 {
                        let e = &even[i * (tw + 1)..(i + 1) * (tw + 1)];
                        let o = &odd[i * (tw + 1)..(i + 1) * (tw + 1)];
                        let at = |j: usize| ((i * 4 + j) * c + ch) * t_all + base;
                        // SAFETY: each thread owns channels `chans`, so the ranges
                        // [at(j), at(j) + tw) it writes are disjoint from every other thread's,
                        // and inside v (base + tw <= t_all, i*4+j < 16).
                        let (v0, v1, v2, v3) = unsafe {
                            (
                                std::slice::from_raw_parts_mut(out.ptr().add(at(0)), tw),
                                std::slice::from_raw_parts_mut(out.ptr().add(at(1)), tw),
                                std::slice::from_raw_parts_mut(out.ptr().add(at(2)), tw),
                                std::slice::from_raw_parts_mut(out.ptr().add(at(3)), tw),
                            )
                        };
                        let (e0, e1) = (&e[..tw], &e[1..=tw]);
                        let o0 = &o[..tw];
                        let o1 = &o[1..=tw];
                        for tx in 0..tw {
                            v0[tx] = e0[tx] - e1[tx];
                            v1[tx] = o0[tx] + e1[tx];
                            v2[tx] = e1[tx] - o0[tx];
                            v3[tx] = o0[tx] - o1[tx];
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// `Y = Aᵀ m A (+ bias)` for `m = [16, O, T]` into `y = [N, O, H, W]`.
#[allow(clippy::too_many_arguments)]
pub fn output_transform(
    m: &[f32],
    n: usize,
    o: usize,
    h: usize,
    w: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let (th, tw) = tiles(h, w);
    let t_all = n * th * tw;
    if m.len() != 16 * o * t_all {
        return Err(shape(
            "WinogradOutput",
            format!(
                "GEMM output has {} values, [16, {o}, {t_all}] needs {}",
                m.len(),
                16 * o * t_all
            ),
        ));
    }
    if y.len() != n * o * h * w {
        return Err(shape(
            "WinogradOutput",
            format!(
                "output has {} values, [{n}, {o}, {h}, {w}] needs {}",
                y.len(),
                n * o * h * w
            ),
        ));
    }
    if let Some(b) = bias {
        if b.len() != o {
            return Err(shape(
                "WinogradOutput",
                format!("bias has {} values, expected {o}", b.len()),
            ));
        }
    }
    if t_all == 0 || o == 0 {
        return Ok(());
    }
    let out = SharedMut(y.as_mut_ptr());
    parallel_ranges(o, |outs| {
        let mut s = vec![0f32; 8 * tw]; // s0[0..4], s1[0..4] over tx
        let mut row0 = vec![0f32; 2 * tw];
        let mut row1 = vec![0f32; 2 * tw];
        for oc in outs {
            let b = bias.map_or(0.0, |b| b[oc]);
            for img in 0..n {
                // SAFETY: each thread owns output channels `outs`; plane (img, oc) is inside y.
                let plane = unsafe {
                    std::slice::from_raw_parts_mut(out.ptr().add((img * o + oc) * h * w), h * w)
                };
                for ty in 0..th {
                    let base = (img * th + ty) * tw;
                    let mk = |k: usize| &m[(k * o + oc) * t_all + base..][..tw];
                    // Aᵀ m over rows: s0 = m0 + m1 + m2, s1 = m1 - m2 - m3 (per column j)
                    for j in 0..4 {
                        let (m0, m1, m2, m3) = (mk(j), mk(4 + j), mk(8 + j), mk(12 + j));
                        let (s0, s1) = s.split_at_mut(4 * tw);
                        let s0 = &mut s0[j * tw..(j + 1) * tw];
                        let s1 = &mut s1[j * tw..(j + 1) * tw];
                        for tx in 0..tw {
                            s0[tx] = m0[tx] + m1[tx] + m2[tx];
                            s1[tx] = m1[tx] - m2[tx] - m3[tx];
                        }
                    }
                    // (Aᵀ m) A over columns, interleaved into the two output rows
                    for (r, dst) in [&mut row0, &mut row1].into_iter().enumerate() {
                        let sr = &s[r * 4 * tw..(r + 1) * 4 * tw];
                        let (a0, a1, a2, a3) = (
                            &sr[..tw],
                            &sr[tw..2 * tw],
                            &sr[2 * tw..3 * tw],
                            &sr[3 * tw..],
                        );
                        for tx in 0..tw {
                            dst[2 * tx] = a0[tx] + a1[tx] + a2[tx] + b;
                            dst[2 * tx + 1] = a1[tx] - a2[tx] - a3[tx] + b;
                        }
                    }
                    for (r, src) in [&row0, &row1].into_iter().enumerate() {
                        let yy = 2 * ty + r;
                        if yy < h {
                            plane[yy * w..(yy + 1) * w].copy_from_slice(&src[..w]);
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// The whole convolution through the transforms with a plain GEMM (tests and references; the
/// runtime does the GEMM in ONNX Runtime): `x = [N, C, H, W]`, `w = [O, C, 3, 3]`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    wd: usize,
) -> Result<Vec<f32>, KernelError> {
    let (th, tw) = tiles(h, wd);
    let t = n * th * tw;
    let u = weight_transform(w, o, c)?;
    let mut v = vec![0f32; 16 * c * t];
    input_transform(x, n, c, h, wd, &mut v)?;
    let mut m = vec![0f32; 16 * o * t];
    for k in 0..16 {
        let uk = &u[k * o * c..(k + 1) * o * c];
        let vk = &v[k * c * t..(k + 1) * c * t];
        let mk = &mut m[k * o * t..(k + 1) * o * t];
        for oo in 0..o {
            let row = &mut mk[oo * t..(oo + 1) * t];
            for cc in 0..c {
                let a = uk[oo * c + cc];
                for (r, &b) in row.iter_mut().zip(&vk[cc * t..(cc + 1) * t]) {
                    *r += a * b;
                }
            }
        }
    }
    let mut y = vec![0f32; n * o * h * wd];
    output_transform(&m, n, o, h, wd, bias, &mut y)?;
    Ok(y)
}

/// Direct 3×3 convolution (stride 1, padding 1) in float64: the reference.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_f64(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    wd: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; n * o * h * wd];
    for img in 0..n {
        for oo in 0..o {
            for yy in 0..h {
                for xx in 0..wd {
                    let mut acc = bias.map_or(0.0, |b| b[oo] as f64);
                    for cc in 0..c {
                        for ky in 0..3 {
                            let iy = yy as isize + ky as isize - 1;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..3 {
                                let ix = xx as isize + kx as isize - 1;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((img * c + cc) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((oo * c + cc) * 3 + ky) * 3 + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((img * o + oo) * h + yy) * wd + xx] = acc;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_direct_convolution_in_float64() {
        // odd and even sizes, 1-pixel planes, 2×2 maps (the deepest UNet level)
        for &(n, c, o, h, w) in &[
            (2, 3, 5, 8, 8),
            (1, 4, 4, 7, 5),
            (3, 2, 3, 1, 1),
            (2, 16, 8, 2, 2),
            (1, 5, 7, 1, 6),
            (2, 8, 3, 9, 4),
        ] {
            let x = rand(n * c * h * w, 1 + h as u64);
            let wt = rand(o * c * 9, 2 + w as u64);
            let b = rand(o, 3);
            let got = conv3x3(&x, &wt, Some(&b), n, c, o, h, w).unwrap();
            let want = conv3x3_f64(&x, &wt, Some(&b), n, c, o, h, w);
            let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (g, r)| m.max((*g as f64 - r).abs()));
            assert!(
                err <= 1e-6 * max.max(1.0),
                "{n}x{c}x{h}x{w} -> {o}: max error {err} (max {max})"
            );
        }
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let mut v = vec![0f32; 10];
        let e = input_transform(&[0.0; 16], 1, 1, 4, 4, &mut v).unwrap_err();
        assert!(e.to_string().contains("tile buffer"), "{e}");
        let e = weight_transform(&[0.0; 8], 1, 1).unwrap_err();
        assert!(e.to_string().contains("[1, 1, 3, 3]"), "{e}");
        let mut y = vec![0f32; 16];
        let e =
            output_transform(&vec![0f32; 64], 1, 1, 4, 4, Some(&[0.0, 1.0]), &mut y).unwrap_err();
        assert!(e.to_string().contains("bias"), "{e}");
    }
}
