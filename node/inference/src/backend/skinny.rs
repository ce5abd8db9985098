//! Matmul for few rows (short batches) on AVX-512:
//! `dst[m,n] += a[m,k] · wtᵀ`, with `wt` the `[n, k]` (PyTorch-layout) weight.
//!
//! With a dozen rows a packed GEMM is memory-bound twice over: it copies the
//! whole weight matrix into its packing buffer on every call and then streams
//! the copy. Here every output is a dot product of an activation row with a
//! contiguous weight row, so the weights stream from memory exactly once per
//! block of up to 12 activation rows, in order, and nothing is copied. A block
//! of 12 rows × 2 weight rows keeps 24 of AVX-512's 32 vector registers as
//! accumulators. Columns are split across the pool's threads.
//!
//! [`available`] says whether the CPU can run it; callers fall back to the
//! packed GEMM otherwise.

use rayon::prelude::*;

use crate::error::{InferenceError, Result};

/// Largest m routed here; above it the packed GEMM wins.
pub const MAX_ROWS: usize = 24;

/// Whether this CPU has AVX-512F.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst += a · wtᵀ`; fails, touching nothing, when the slice lengths do not
/// match `(m, k, n)` or the CPU lacks AVX-512F.
#[cfg(target_arch = "x86_64")]
pub fn matmul_t_acc(
    dst: &mut [f32],
    a: &[f32],
    wt: &[f32],
    (m, k, n): (usize, usize, usize),
    threads: usize,
) -> Result<()> {
    if a.len() != m * k || wt.len() != n * k || dst.len() != m * n {
        return Err(InferenceError::Backend("few-rows matmul: shapes do not match".into()));
    }
    if !available() {
        return Err(InferenceError::Backend("few-rows matmul needs AVX-512F".into()));
    }
    let chunk = n.div_ceil(threads.max(1) * 4).max(2).next_multiple_of(2);
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|t| {
            let c0 = t * chunk;
            let c1 = (c0 + chunk).min(n);
            let width = c1 - c0;
            let mut out = vec![0.0f32; m * width];
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(12);
                let mut c = c0;
                while c < c1 {
                    let cols = (c1 - c).min(2);
                    let mut res = [[0.0f32; 2]; 12];
                    // SAFETY: AVX-512F was checked above; rows r0..r0+rows of
                    // `a` and rows c..c+cols of `wt` are in bounds by the
                    // length checks above, and each is k floats long.
                    unsafe { block(a.as_ptr().add(r0 * k), wt.as_ptr().add(c * k), k, rows, cols, &mut res) };
                    for (r, rr) in res.iter().enumerate().take(rows) {
                        for (j, v) in rr.iter().enumerate().take(cols) {
                            out[(r0 + r) * width + (c - c0) + j] = *v;
                        }
                    }
                    c += cols;
                }
                r0 += rows;
            }
            (c0, out)
        })
        .collect();
    for (c0, out) in parts {
        let width = out.len() / m.max(1);
        for r in 0..m {
            dst[r * n + c0..r * n + c0 + width]
                .iter_mut()
                .zip(&out[r * width..(r + 1) * width])
                .for_each(|(d, o)| *d += o);
        }
    }
    Ok(())
}

/// Other architectures have no few-rows kernel ([`available`] is false).
#[cfg(not(target_arch = "x86_64"))]
pub fn matmul_t_acc(_: &mut [f32], _: &[f32], _: &[f32], _: (usize, usize, usize), _: usize) -> Result<()> {
    Err(InferenceError::Backend(
        "few-rows matmul needs x86-64 with AVX-512F".into(),
    ))
}

/// Dot products of `rows` (≤ 12) activation rows starting at `a` with `cols`
/// (≤ 2) weight rows starting at `w`, all `k` long, into `res`.
///
/// # Safety
/// AVX-512F must be available, and `a` must point to `rows*k` readable floats
/// and `w` to `cols*k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block(a: *const f32, w: *const f32, k: usize, rows: usize, cols: usize, res: &mut [[f32; 2]; 12]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; 12];
    let full = k / 16 * 16;
    let mut kk = 0;
    // Missing rows/columns read row 0 again (always valid) and are discarded,
    // so the unrolled body has no data-dependent branches.
    let w1 = if cols > 1 { 1 } else { 0 };
    let arow: [usize; 12] = std::array::from_fn(|r| if r < rows { r } else { 0 });
    while kk < full {
        // SAFETY: kk + 16 <= k, rows/cols index valid rows (see above).
        unsafe {
            // Weight rows are read exactly once: ask for the next lines of
            // this stream early (prefetches never fault, even past the end).
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(2 * k + kk) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(3 * k + kk) as *const i8);
            let wv0 = _mm512_loadu_ps(w.add(kk));
            let wv1 = _mm512_loadu_ps(w.add(w1 * k + kk));
            for r in 0..12 {
                let av = _mm512_loadu_ps(a.add(arow[r] * k + kk));
                acc[r][0] = _mm512_fmadd_ps(av, wv0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(av, wv1, acc[r][1]);
            }
        }
        kk += 16;
    }
    for r in 0..rows {
        for (j, &wj) in [0, w1].iter().enumerate().take(cols) {
            let mut s = _mm512_reduce_add_ps(acc[r][j]);
            for t in full..k {
                // SAFETY: t < k on valid rows.
                s += unsafe { *a.add(r * k + t) * *w.add(wj * k + t) };
            }
            res[r][j] = s;
        }
    }
}
