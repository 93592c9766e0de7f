//! CPU implementations of motionrt's attention operators (`com.motionrt` domain; schemas in
//! `docs/operators.md`): float32 in and out, one pass over the keys per query row with an online
//! (running-max) softmax, float32 accumulation, sequences spread over threads.

use std::ops::Range;

/// Kernel argument errors: what was passed and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
}

fn shape_err(op: &'static str, what: String) -> KernelError {
    KernelError::Shape { op, what }
}

/// Multi-head attention over the middle axis of `[N, L, H·d]` tokens: `TemporalAttention` with
/// tokens `(B·h·w, F, C)`, so `L = S = F` frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Independent sequences (`B·h·w`).
    pub sequences: usize,
    /// Query positions per sequence.
    pub q_len: usize,
    /// Key/value positions per sequence.
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Logit scale (`1/√d` by default).
    pub scale: f32,
}

impl Attention {
    pub fn new(
        sequences: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            sequences,
            q_len,
            kv_len,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Check buffer lengths; `bias_heads` is 1 or `heads` when a bias `[bias_heads, L, S]` is given.
    pub fn check(
        &self,
        q: usize,
        k: usize,
        v: usize,
        bias: Option<(usize, usize)>,
        out: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "TemporalAttention";
        if self.heads == 0 || self.head_dim == 0 {
            return Err(shape_err(
                OP,
                "num_heads and the head size must be positive".into(),
            ));
        }
        let c = self.width();
        let nq = self.sequences * self.q_len * c;
        let nk = self.sequences * self.kv_len * c;
        for (name, got, want) in [
            ("Q", q, nq),
            ("K", k, nk),
            ("V", v, nk),
            ("output", out, nq),
        ] {
            if got != want {
                return Err(shape_err(
                    OP,
                    format!(
                        "{name} has {got} values; [{}, {}, {c}] needs {want}",
                        self.sequences,
                        if name == "K" || name == "V" {
                            self.kv_len
                        } else {
                            self.q_len
                        }
                    ),
                ));
            }
        }
        if let Some((bh, len)) = bias {
            if !(bh == 1 || bh == self.heads) || len != bh * self.q_len * self.kv_len {
                return Err(shape_err(
                    OP,
                    format!(
                        "bias has {len} values; expected [1 or {}, {}, {}]",
                        self.heads, self.q_len, self.kv_len
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `out = softmax(scale·Q·Kᵀ + bias)·V` per sequence and head; `bias` is `[1 or H, L, S]`.
    pub fn run(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let bias_heads = bias.map(|b| b.len() / (self.q_len * self.kv_len).max(1));
        self.check(
            q.len(),
            k.len(),
            v.len(),
            bias_heads.zip(bias.map(<[f32]>::len)),
            out.len(),
        )?;
        let rows = self.q_len * self.width();
        parallel_sequences(out, rows, self.sequences, |range, chunk| {
            let c = self.width();
            let mut acc = vec![0f32; self.head_dim];
            for (j, n) in range.enumerate() {
                for h in 0..self.heads {
                    for i in 0..self.q_len {
                        let qr =
                            &q[(n * self.q_len + i) * c + h * self.head_dim..][..self.head_dim];
                        let keys =
                            (0..self.kv_len).map(|t| (n * self.kv_len + t) * c + h * self.head_dim);
                        let b = bias.map(|b| {
                            let bh = if b.len() == self.q_len * self.kv_len {
                                0
                            } else {
                                h
                            };
                            &b[(bh * self.q_len + i) * self.kv_len..][..self.kv_len]
                        });
                        online_softmax_row(qr, k, v, keys, b, self.scale, &mut acc);
                        chunk[(j * self.q_len + i) * c + h * self.head_dim..][..self.head_dim]
                            .copy_from_slice(&acc);
                    }
                }
            }
        });
        Ok(())
    }
}

/// Tune-A-Video's sparse-causal attention over `[B·F, S, H·d]` tokens (`S = h·w` per frame):
/// the queries of frame `i` attend to the keys/values of frame 0 followed by those of frame
/// `max(i − 1, 0)` (`2S` keys; frame 0 sees its own keys twice, as the original concatenates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseCausal {
    pub videos: usize,
    pub frames: usize,
    /// Tokens per frame (`h·w`).
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl SparseCausal {
    pub fn new(videos: usize, frames: usize, tokens: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            videos,
            frames,
            tokens,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    pub fn check(&self, q: usize, k: usize, v: usize, out: usize) -> Result<(), KernelError> {
        const OP: &str = "SparseCausalAttention";
        if self.heads == 0 || self.head_dim == 0 || self.frames == 0 {
            return Err(shape_err(
                OP,
                "frames, num_heads and the head size must be positive".into(),
            ));
        }
        let c = self.heads * self.head_dim;
        let n = self.videos * self.frames * self.tokens * c;
        for (name, got) in [("Q", q), ("K", k), ("V", v), ("output", out)] {
            if got != n {
                return Err(shape_err(
                    OP,
                    format!(
                        "{name} has {got} values; [{}·{}, {}, {c}] needs {n}",
                        self.videos, self.frames, self.tokens
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn run(&self, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        self.check(q.len(), k.len(), v.len(), out.len())?;
        let c = self.heads * self.head_dim;
        let rows = self.tokens * c;
        parallel_sequences(out, rows, self.videos * self.frames, |range, chunk| {
            let mut acc = vec![0f32; self.head_dim];
            for (j, bf) in range.enumerate() {
                let (b, i) = (bf / self.frames, bf % self.frames);
                let first = b * self.frames;
                let prev = b * self.frames + i.saturating_sub(1);
                for h in 0..self.heads {
                    for t in 0..self.tokens {
                        let qr =
                            &q[(bf * self.tokens + t) * c + h * self.head_dim..][..self.head_dim];
                        let keys = (0..2 * self.tokens).map(|u| {
                            let (f, u) = if u < self.tokens {
                                (first, u)
                            } else {
                                (prev, u - self.tokens)
                            };
                            (f * self.tokens + u) * c + h * self.head_dim
                        });
                        online_softmax_row(qr, k, v, keys, None, self.scale, &mut acc);
                        chunk[(j * self.tokens + t) * c + h * self.head_dim..][..self.head_dim]
                            .copy_from_slice(&acc);
                    }
                }
            }
        });
        Ok(())
    }
}

/// One query row: `acc = Σ_t softmax_t(scale·q·k_t + bias_t) v_t` over the key offsets `keys`
/// (each the start of a `d`-long row in `k` and `v`), in one pass with a running maximum.
fn online_softmax_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: impl Iterator<Item = usize>,
    bias: Option<&[f32]>,
    scale: f32,
    acc: &mut [f32],
) {
    let d = q.len();
    acc.iter_mut().for_each(|a| *a = 0.0);
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0f32;
    for (t, off) in keys.enumerate() {
        let kr = &k[off..off + d];
        let mut s = 0f32;
        for (a, b) in q.iter().zip(kr) {
            s += a * b;
        }
        s *= scale;
        if let Some(b) = bias {
            s += b[t];
        }
        let vr = &v[off..off + d];
        if s > max {
            // rescale what was accumulated under the old maximum
            let r = (max - s).exp();
            sum *= r;
            acc.iter_mut().for_each(|a| *a *= r);
            max = s;
        }
        let p = (s - max).exp();
        sum += p;
        for (a, x) in acc.iter_mut().zip(vr) {
            *a += p * x;
        }
    }
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    acc.iter_mut().for_each(|a| *a *= inv);
}

/// Split `out` (`count` sequences of `rows` values each) over up to the available cores; `f`
/// gets a range of sequences and their contiguous output chunk.
fn parallel_sequences<F>(out: &mut [f32], rows: usize, count: usize, f: F)
where
    F: Fn(Range<usize>, &mut [f32]) + Sync,
{
    if count == 0 || rows == 0 {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count);
    let per = count.div_ceil(threads);
    if threads <= 1 {
        f(0..count, out);
        return;
    }
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per * rows).enumerate() {
            let f = &f;
            let start = t * per;
            let end = (start + per).min(count);
            s.spawn(move || f(start..end, chunk));
        }
    });
}

/// Straightforward float64 computations (scores materialised, then softmax, then the weighted
/// sum) for testing the kernels.
pub mod reference {
    /// `[N, L, H·d]` attention with optional `[1 or H, L, S]` bias, in float64.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        l: usize,
        s: usize,
        heads: usize,
        d: usize,
        scale: f64,
    ) -> Vec<f64> {
        let c = heads * d;
        let mut out = vec![0f64; n * l * c];
        for b in 0..n {
            for h in 0..heads {
                for i in 0..l {
                    let keys: Vec<usize> = (0..s).map(|t| (b * s + t) * c + h * d).collect();
                    let bias_row: Option<Vec<f64>> = bias.map(|bb| {
                        let bh = if bb.len() == l * s { 0 } else { h };
                        bb[(bh * l + i) * s..][..s]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    });
                    let o = row(
                        &q[(b * l + i) * c + h * d..][..d],
                        k,
                        v,
                        &keys,
                        bias_row.as_deref(),
                        scale,
                    );
                    out[(b * l + i) * c + h * d..][..d].copy_from_slice(&o);
                }
            }
        }
        out
    }

    /// Sparse-causal attention over `[B·F, S, H·d]` in float64, keys gathered exactly as
    /// Tune-A-Video does: `cat(k[:, [0]*F], k[:, former_frame_index])` with
    /// `former_frame_index = arange(F) − 1`, `former_frame_index[0] = 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_causal(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        videos: usize,
        frames: usize,
        tokens: usize,
        heads: usize,
        d: usize,
        scale: f64,
    ) -> Vec<f64> {
        let c = heads * d;
        let mut out = vec![0f64; videos * frames * tokens * c];
        for b in 0..videos {
            for i in 0..frames {
                let former = if i == 0 { 0 } else { i - 1 };
                for h in 0..heads {
                    let keys: Vec<usize> = [0, former]
                        .iter()
                        .flat_map(|&f| {
                            (0..tokens).map(move |t| ((b * frames + f) * tokens + t) * c + h * d)
                        })
                        .collect();
                    for t in 0..tokens {
                        let qo = ((b * frames + i) * tokens + t) * c + h * d;
                        let o = row(&q[qo..qo + d], k, v, &keys, None, scale);
                        out[qo..qo + d].copy_from_slice(&o);
                    }
                }
            }
        }
        out
    }

    fn row(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        keys: &[usize],
        bias: Option<&[f64]>,
        scale: f64,
    ) -> Vec<f64> {
        let d = q.len();
        let scores: Vec<f64> = keys
            .iter()
            .enumerate()
            .map(|(t, &off)| {
                let dot: f64 = q
                    .iter()
                    .zip(&k[off..off + d])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                dot * scale + bias.map_or(0.0, |b| b[t])
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut o = vec![0f64; d];
        for (w, &off) in e.iter().zip(keys) {
            for (x, &val) in o.iter_mut().zip(&v[off..off + d]) {
                *x += w / sum * val as f64;
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-2, 2).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// max |a − b| relative to max |b|.
    fn rel_err(a: &[f32], b: &[f64]) -> f64 {
        let m = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(0f64, f64::max)
            / m.max(1e-30)
    }

    #[test]
    fn temporal_matches_float64_on_many_shapes() {
        // (sequences, frames, heads, head_dim, bias heads)
        for &(n, f, h, d, bias) in &[
            (7, 1, 8, 40, None),
            (5, 2, 8, 40, Some(1)),
            (9, 16, 8, 40, Some(8)),
            (3, 24, 8, 80, None),
            (2, 16, 4, 160, Some(4)),
            (33, 16, 1, 8, None),
        ] {
            let c = h * d;
            let (q, k, v) = (
                values(n * f * c, 1),
                values(n * f * c, 2),
                values(n * f * c, 3),
            );
            let b = bias.map(|bh| values(bh * f * f, 4));
            let a = Attention::new(n, f, f, h, d);
            let mut out = vec![f32::NAN; n * f * c];
            a.run(&q, &k, &v, b.as_deref(), &mut out).unwrap();
            let want =
                reference::attention(&q, &k, &v, b.as_deref(), n, f, f, h, d, a.scale as f64);
            let e = rel_err(&out, &want);
            assert!(e < 2e-6, "n={n} f={f} h={h} d={d}: {e:e}");
        }
    }

    #[test]
    fn sparse_causal_matches_float64_and_frame_zero_sees_itself() {
        for &(b, f, s, h, d) in &[
            (1, 1, 5, 2, 40),
            (2, 2, 9, 8, 40),
            (1, 16, 15, 8, 80),
            (1, 24, 7, 2, 160),
        ] {
            let c = h * d;
            let len = b * f * s * c;
            let (q, k, v) = (values(len, 5), values(len, 6), values(len, 7));
            let op = SparseCausal::new(b, f, s, h, d);
            let mut out = vec![f32::NAN; len];
            op.run(&q, &k, &v, &mut out).unwrap();
            let want = reference::sparse_causal(&q, &k, &v, b, f, s, h, d, op.scale as f64);
            let e = rel_err(&out, &want);
            assert!(e < 2e-6, "b={b} f={f} s={s} h={h} d={d}: {e:e}");
            // frame 0 attends to its own keys twice: the same as plain attention over them
            let plain = reference::attention(
                &q[..s * c],
                &k[..s * c],
                &v[..s * c],
                None,
                1,
                s,
                s,
                h,
                d,
                op.scale as f64,
            );
            assert!(rel_err(&out[..s * c], &plain) < 2e-6);
        }
    }

    #[test]
    fn bad_shapes_are_named() {
        let a = Attention::new(2, 3, 3, 2, 4);
        let e = a
            .run(&[0.0; 48], &[0.0; 47], &[0.0; 48], None, &mut [0.0; 48])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "TemporalAttention: K has 47 values; [2, 3, 8] needs 48"
        );
        let e = a
            .run(
                &[0.0; 48],
                &[0.0; 48],
                &[0.0; 48],
                Some(&[0.0; 10]),
                &mut [0.0; 48],
            )
            .unwrap_err();
        assert!(e.to_string().contains("bias has 10 values"), "{e}");
        let s = SparseCausal::new(1, 2, 3, 2, 4);
        let e = s
            .run(&[0.0; 48], &[0.0; 48], &[0.0; 48], &mut [0.0; 47])
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("SparseCausalAttention: output has 47 values"),
            "{e}"
        );
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let (n, f, h, d) = (2, 4, 1, 8);
        let q: Vec<f32> = values(n * f * d, 9).iter().map(|x| x * 300.0).collect();
        let k = values(n * f * d, 10);
        let v = values(n * f * d, 11);
        let a = Attention::new(n, f, f, h, d);
        let mut out = vec![0f32; n * f * d];
        a.run(&q, &k, &v, None, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        let want = reference::attention(&q, &k, &v, None, n, f, f, h, d, a.scale as f64);
        assert!(rel_err(&out, &want) < 1e-5);
    }
}
