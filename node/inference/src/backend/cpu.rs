//! The native CPU engine and the reference kernels.
//!
//! [`ops`] holds plain, obviously-correct kernels (GEMM via the `gemm` crate,
//! layer norm, exact-erf GELU, masked attention, pooling). They serve both
//! as building blocks of [`CpuBackend`] and as the reference the wgpu kernels
//! are tested against.
//!
//! [`CpuBackend`] packs a batch's sequences back to back (no padding), so the
//! linear layers run one GEMM over exactly the batch's real tokens, and
//! attention runs per (sequence, head) in parallel. It owns a rayon pool
//! sized by `cpu_threads`, so it never competes with the tokio runtime's
//! workers for a global pool.

use std::sync::Arc;

use rayon::prelude::*;

use super::skinny;
use super::{Backend, BackendInfo, check_batch, check_weights};
use crate::error::{InferenceError, Result};
use crate::model::{BertWeights, LayerWeights, transpose};

/// Reference kernels on row-major `f32` slices.
pub mod ops {
    use rayon::prelude::*;

    use crate::error::{InferenceError, Result};

    /// `erf(x)` by the rational approximation Eigen and XLA use for `f32`
    /// (max abs error about 7e-8 on [-4, 4], ±1 beyond); the same formula is
    /// in the WGSL GELU so both backends round alike.
    #[inline]
    pub fn erf(x: f32) -> f32 {
        let x = x.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
        p = x2 * p - 2.101_024e-6;
        p = x2 * p - 5.692_506_4e-5;
        p = x2 * p - 7.349_906_3e-4;
        p = x2 * p - 2.954_600_6e-3;
        p = x2 * p - 1.609_603_3e-2;
        p *= x;
        let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
        q = x2 * q - 1.682_827e-3;
        q = x2 * q - 7.373_329e-3;
        q = x2 * q - 1.426_474e-2;
        p / q
    }

    /// Exact GELU, `x/2 · (1 + erf(x/√2))`.
    #[inline]
    pub fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    /// Applies [`gelu`] to every element, in parallel chunks.
    pub fn gelu_inplace(x: &mut [f32]) {
        x.par_chunks_mut(4096).for_each(gelu_chunk);
    }

    /// Defines `fn $name($args)` that runs `$body($args)` compiled for
    /// AVX-512 or AVX2 + FMA when the CPU has them (the crate is built for
    /// baseline x86-64), else as is. `$body` must be `#[inline(always)]` so
    /// it is compiled inside each feature-specific copy.
    macro_rules! simd_kernel {
        ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
            $(#[$meta])*
            $vis fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn avx512($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) {
                        $body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: AVX-512F support was just checked.
                        return unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: AVX2 and FMA support were just checked.
                        return unsafe { avx2($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    simd_kernel!(
        /// The GELU loop: the erf polynomial is branch-free, so it vectorizes fully.
        fn gelu_chunk(c: &mut [f32]) => gelu_body
    );

    #[inline(always)]
    fn gelu_body(c: &mut [f32]) {
        c.iter_mut().for_each(|v| *v = gelu(*v));
    }

    /// `e^x` for `x <= 0` (softmax inputs after the max is subtracted), by
    /// range reduction to `r` in [-ln2/2, ln2/2] and a degree-6 polynomial:
    /// relative error below 3e-7, no libm call, so loops over it vectorize.
    #[inline(always)]
    pub fn exp_nonpositive(x: f32) -> f32 {
        // Below this e^x is under f32's normal range; softmax weights there are 0.
        let x = x.max(-87.0);
        let k = (x * std::f32::consts::LOG2_E).round();
        // ln 2 split in two so k·ln2 is subtracted without rounding error.
        let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
        let mut p = 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        p * f32::from_bits(((k as i32 + 127) as u32) << 23)
    }

    /// Lanes of the vectorized reductions (one AVX-512 register of f32).
    const LANES: usize = 16;

    /// Max and sum reduce into [`LANES`] independent accumulators: a single
    /// running float can't be vectorized without reordering its additions.
    #[inline(always)]
    fn lane_reduce(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [init; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = f(*a, x);
            }
        }
        let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
        acc.iter().fold(tail, |a, &x| f(a, x))
    }

    simd_kernel!(
        /// Softmax of each `n`-wide row of `s`, in place: same result as
        /// [`softmax_row`] within 1e-7, in passes that vectorize.
        pub fn softmax_rows(s: &mut [f32], n: usize) => softmax_rows_body
    );

    #[inline(always)]
    fn softmax_rows_body(s: &mut [f32], n: usize) {
        for row in s.chunks_exact_mut(n) {
            let max = lane_reduce(row, f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|x| *x = exp_nonpositive(*x - max));
            let inv = 1.0 / lane_reduce(row, 0.0, |a, b| a + b);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// `dst[m,n] = a[m,k] · w[k,n] (+ bias[n])`, row-major, multi-threaded
    /// on the current rayon pool.
    pub fn matmul_bias_into(
        dst: &mut [f32],
        a: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
        threads: usize,
    ) -> Result<()> {
        if a.len() != m * k || w.len() != k * n || dst.len() != m * n {
            return Err(InferenceError::Backend(format!(
                "matmul shapes: a {} (want {}), w {} (want {}), dst {} (want {})",
                a.len(),
                m * k,
                w.len(),
                k * n,
                dst.len(),
                m * n
            )));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(InferenceError::Backend(format!(
                    "matmul bias has {} elements, want {n}",
                    b.len()
                )));
            }
            for row in dst.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if bias.is_none() {
                dst.fill(0.0);
            }
            return Ok(());
        }
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the lengths were checked above, so every index the
        // row-major strides (n, 1), (k, 1), (n, 1) reach is in bounds, and
        // `dst` is exclusively borrowed.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                bias.is_some(),
                a.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        Ok(())
    }

    /// Allocating form of [`matmul_bias_into`], using the current rayon pool.
    pub fn matmul_bias(a: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        let mut dst = vec![0.0; m * n];
        matmul_bias_into(&mut dst, a, w, bias, (m, k, n), rayon::current_num_threads())?;
        Ok(dst)
    }

    /// One row of layer norm: `row = (row + residual - mean) / sqrt(var + eps) · g + b`.
    #[inline]
    pub fn layer_norm_row(row: &mut [f32], residual: Option<&[f32]>, g: &[f32], b: &[f32], eps: f32) {
        if let Some(r) = residual {
            row.iter_mut().zip(r).for_each(|(x, r)| *x += r);
        }
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(g).zip(b) {
            *x = (*x - mean) * inv * g + b;
        }
    }

    /// Layer norm over each row of `x` (`cols` wide), adding `residual` first when given.
    pub fn layer_norm(x: &mut [f32], residual: Option<&[f32]>, g: &[f32], b: &[f32], cols: usize, eps: f32) {
        match residual {
            Some(r) => x
                .par_chunks_mut(cols)
                .zip(r.par_chunks(cols))
                .for_each(|(row, r)| layer_norm_row(row, Some(r), g, b, eps)),
            None => x
                .par_chunks_mut(cols)
                .for_each(|row| layer_norm_row(row, None, g, b, eps)),
        }
    }

    /// Numerically stable softmax of one row, in place.
    #[inline]
    pub fn softmax_row(row: &mut [f32]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }

    /// Sum of word, position and token-type-0 embeddings for a padded
    /// `[batch, seq]` id grid, `[batch*seq, hidden]` (no layer norm). An id
    /// past the word table is an [`InferenceError::InvalidRequest`] naming
    /// `ids[t]`; tables too small for `seq` and `hidden` are errors too.
    pub fn embeddings(
        word: &[f32],
        pos: &[f32],
        typ: &[f32],
        ids: &[u32],
        seq: usize,
        hidden: usize,
    ) -> Result<Vec<f32>> {
        crate::backend::check_embedding_lookup(word, pos, typ, ids, seq, hidden)?;
        let mut out = vec![0.0; ids.len() * hidden];
        for (t, (&id, o)) in ids.iter().zip(out.chunks_exact_mut(hidden)).enumerate() {
            let id = id as usize;
            let p = t % seq;
            for j in 0..hidden {
                o[j] = word[id * hidden + j] + pos[p * hidden + j] + typ[j];
            }
        }
        Ok(out)
    }

    /// Reference multi-head attention on a padded layout: `qkv` is
    /// `[batch*seq, 3*hidden]` (Q, K, V columns), `mask[batch*seq]` is 1 for
    /// real tokens; keys with mask 0 get no weight. Returns `[batch*seq, hidden]`.
    pub fn attention_padded(
        qkv: &[f32],
        mask: &[u32],
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Vec<f32> {
        let hidden = heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0; batch * seq * hidden];
        let mut scores = vec![0.0; seq];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq {
                    let q = &qkv[(b * seq + i) * 3 * hidden + h * head_dim..][..head_dim];
                    let mut keys = Vec::with_capacity(seq);
                    for j in 0..seq {
                        if mask[b * seq + j] == 0 {
                            continue;
                        }
                        let k = &qkv[(b * seq + j) * 3 * hidden + hidden + h * head_dim..][..head_dim];
                        scores[keys.len()] = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                        keys.push(j);
                    }
                    if keys.is_empty() {
                        continue;
                    }
                    let s = &mut scores[..keys.len()];
                    softmax_row(s);
                    let o = &mut out[(b * seq + i) * hidden + h * head_dim..][..head_dim];
                    for (&j, &p) in keys.iter().zip(s.iter()) {
                        let v = &qkv[(b * seq + j) * 3 * hidden + 2 * hidden + h * head_dim..][..head_dim];
                        o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        }
        out
    }

    /// Masked mean over the sequence axis followed by L2 normalization:
    /// `x` is `[batch*seq, hidden]`, result `[batch, hidden]`.
    pub fn mean_pool_normalize(x: &[f32], mask: &[u32], batch: usize, seq: usize, hidden: usize) -> Vec<f32> {
        let mut out = vec![0.0; batch * hidden];
        for b in 0..batch {
            let o = &mut out[b * hidden..(b + 1) * hidden];
            let mut count = 0.0f32;
            for t in 0..seq {
                if mask[b * seq + t] != 0 {
                    count += 1.0;
                    o.iter_mut()
                        .zip(&x[(b * seq + t) * hidden..][..hidden])
                        .for_each(|(o, x)| *o += x);
                }
            }
            let c = count.max(1e-9);
            o.iter_mut().for_each(|v| *v /= c);
            l2_normalize(o);
        }
        out
    }

    /// Scales `v` to unit L2 norm (the norm is clamped at 1e-12 as PyTorch does).
    pub fn l2_normalize(v: &mut [f32]) {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The native CPU engine.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    weights: Option<Arc<BertWeights>>,
    /// Per layer, the linear weights back in `[out, in]` layout for the
    /// few-rows kernel (qkv, attention output, feed-forward in, out); empty
    /// when the CPU cannot run that kernel.
    transposed: Vec<[Vec<f32>; 4]>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .field("loaded", &self.weights.is_some())
            .finish()
    }
}

impl CpuBackend {
    /// Creates the engine with `threads` workers (0: one per core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cell0-infer-cpu-{i}"))
            .build()
            .map_err(|e| InferenceError::Backend(format!("cannot start CPU threads: {e}")))?;
        Ok(Self {
            pool,
            threads,
            weights: None,
            transposed: Vec::new(),
        })
    }

    /// Runs the encoder on `batch`; its matrix products use `threads` threads.
    fn forward(&self, w: &BertWeights, batch: &[Vec<u32>], threads: usize) -> Result<Vec<Vec<f32>>> {
        let c = &w.config;
        let h = c.hidden_size;
        let inter = c.intermediate_size;
        let heads = c.num_attention_heads;
        let hd = c.head_dim();
        let eps = c.layer_norm_eps;
        let t: usize = batch.iter().map(Vec::len).sum();
        let mut offsets = Vec::with_capacity(batch.len());
        let mut off = 0;
        for s in batch {
            offsets.push((off, s.len()));
            off += s.len();
        }

        let mut x = vec![0.0f32; t * h];
        for (s, &(o, _)) in batch.iter().zip(&offsets) {
            for (p, &id) in s.iter().enumerate() {
                let row = &mut x[(o + p) * h..(o + p + 1) * h];
                // `check_batch` has bounded ids and positions by the tables;
                // a lookup past them is still an error, never a panic.
                let we = table_row(&w.word_emb, id as usize, h)
                    .ok_or_else(|| InferenceError::Backend(format!("token id {id} is outside the word table")))?;
                let pe = table_row(&w.pos_emb, p, h)
                    .ok_or_else(|| InferenceError::Backend(format!("position {p} is outside the position table")))?;
                let te = table_row(&w.type_emb, 0, h)
                    .ok_or_else(|| InferenceError::Backend("the token type table has no row 0".into()))?;
                for j in 0..h {
                    row[j] = we[j] + pe[j] + te[j];
                }
            }
        }
        ops::layer_norm(&mut x, None, &w.emb_ln_g, &w.emb_ln_b, h, eps);

        let mut qkv = vec![0.0f32; t * 3 * h];
        let mut ctx = vec![0.0f32; t * h];
        let mut tmp = vec![0.0f32; t * h];
        let mut ff = vec![0.0f32; t * inter];
        for (li, l) in w.layers.iter().enumerate() {
            self.layer(
                threads,
                l,
                self.transposed.get(li),
                (h, inter, heads, hd, eps),
                &offsets,
                &mut x,
                &mut qkv,
                &mut ctx,
                &mut tmp,
                &mut ff,
            )?;
        }

        Ok(offsets
            .iter()
            .map(|&(o, n)| {
                let mut v = vec![0.0f32; h];
                for r in 0..n {
                    v.iter_mut()
                        .zip(&x[(o + r) * h..(o + r + 1) * h])
                        .for_each(|(a, b)| *a += b);
                }
                let inv = 1.0 / n as f32;
                v.iter_mut().for_each(|a| *a *= inv);
                ops::l2_normalize(&mut v);
                v
            })
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        threads: usize,
        l: &LayerWeights,
        wt: Option<&[Vec<f32>; 4]>,
        (h, inter, heads, hd, eps): (usize, usize, usize, usize, f32),
        offsets: &[(usize, usize)],
        x: &mut [f32],
        qkv: &mut [f32],
        ctx: &mut [f32],
        tmp: &mut [f32],
        ff: &mut [f32],
    ) -> Result<()> {
        let t = x.len() / h;
        linear(
            threads,
            qkv,
            x,
            &l.qkv_w,
            wt.map(|w| &w[0][..]),
            &l.qkv_b,
            (t, h, 3 * h),
        )?;

        let scale = 1.0 / (hd as f32).sqrt();
        let qkv_ro: &[f32] = qkv;
        let tasks: Vec<(usize, usize, usize)> = offsets
            .iter()
            .flat_map(|&(o, n)| (0..heads).map(move |hh| (o, n, hh)))
            .collect();
        let parts: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(o, n, hh)| attention_head(qkv_ro, o, n, hh, h, hd, scale))
            .collect();
        for (&(o, n, hh), part) in tasks.iter().zip(&parts) {
            for r in 0..n {
                ctx[(o + r) * h + hh * hd..][..hd].copy_from_slice(&part[r * hd..(r + 1) * hd]);
            }
        }

        linear(
            threads,
            tmp,
            ctx,
            &l.attn_out_w,
            wt.map(|w| &w[1][..]),
            &l.attn_out_b,
            (t, h, h),
        )?;
        ops::layer_norm(x, Some(tmp), &l.ln1_g, &l.ln1_b, h, eps);
        linear(
            threads,
            ff,
            x,
            &l.ff_in_w,
            wt.map(|w| &w[2][..]),
            &l.ff_in_b,
            (t, h, inter),
        )?;
        ops::gelu_inplace(ff);
        linear(
            threads,
            tmp,
            ff,
            &l.ff_out_w,
            wt.map(|w| &w[3][..]),
            &l.ff_out_b,
            (t, inter, h),
        )?;
        ops::layer_norm(x, Some(tmp), &l.ln2_g, &l.ln2_b, h, eps);
        Ok(())
    }
}

/// Row `row` of a row-major `[rows, width]` table, if it has one.
fn table_row(table: &[f32], row: usize, width: usize) -> Option<&[f32]> {
    let start = row.checked_mul(width)?;
    table.get(start..start.checked_add(width)?)
}

/// `dst = x · w + bias` on `threads` threads: the few-rows kernel (weights
/// `wt`, `[out, in]`) for short batches when the CPU has it, the packed GEMM
/// otherwise.
fn linear(
    threads: usize,
    dst: &mut [f32],
    x: &[f32],
    w: &[f32],
    wt: Option<&[f32]>,
    bias: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    match wt {
        Some(wt) if m <= skinny::MAX_ROWS && x.len() == m * k && wt.len() == k * n && dst.len() == m * n => {
            if bias.len() != n {
                return Err(InferenceError::Backend("linear: bias length".into()));
            }
            for row in dst.chunks_exact_mut(n) {
                row.copy_from_slice(bias);
            }
            skinny::matmul_t_acc(dst, x, wt, (m, k, n), threads)
        }
        _ => ops::matmul_bias_into(dst, x, w, Some(bias), (m, k, n), threads),
    }
}

/// Least tokens per thread for which a batch is split by sequence rather
/// than running each product on every thread.
const MIN_TOKENS_PER_THREAD: usize = 256;

/// Splits `batch` into at most `threads` consecutive groups with about the
/// same number of tokens each; one group when the batch is too small to
/// share (then every product runs on all threads instead).
fn split_by_tokens(batch: &[Vec<u32>], threads: usize) -> Vec<&[Vec<u32>]> {
    let total: usize = batch.iter().map(Vec::len).sum();
    let parts = threads.min(batch.len()).min(total / MIN_TOKENS_PER_THREAD).max(1);
    let mut groups = Vec::with_capacity(parts);
    let (mut start, mut before) = (0, 0);
    for (i, s) in batch.iter().enumerate() {
        // Cut before a sequence whose middle lies past the current group's
        // share, so the split lands at the nearest sequence boundary.
        let middle = before + s.len() / 2;
        if i > start && groups.len() + 1 < parts && middle * parts >= total * (groups.len() + 1) {
            groups.push(&batch[start..i]);
            start = i;
        }
        before += s.len();
    }
    if start < batch.len() {
        groups.push(&batch[start..]);
    }
    groups
}

/// Attention of one head over one packed sequence of `n` tokens starting at
/// row `o` of `qkv`; returns its `[n, hd]` context.
fn attention_head(qkv: &[f32], o: usize, n: usize, hh: usize, h: usize, hd: usize, scale: f32) -> Vec<f32> {
    let stride = 3 * h;
    let q = &qkv[o * stride + hh * hd..];
    let k = &qkv[o * stride + h + hh * hd..];
    let v = &qkv[o * stride + 2 * h + hh * hd..];
    let mut s = vec![0.0f32; n * n];
    let mut out = vec![0.0f32; n * hd];
    // SAFETY: the callers' offsets come from packing `n` real tokens at row
    // `o` of a `[t, 3h]` buffer, so rows o..o+n and columns hh*hd..+hd of
    // Q, K and V are in bounds for every stride used; `s` and `out` are
    // sized exactly n×n and n×hd.
    unsafe {
        // scores[i, j] = q_i · k_j: rhs is Kᵀ, read through swapped strides.
        gemm::gemm(
            n,
            n,
            hd,
            s.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.as_ptr(),
            1,
            stride as isize,
            k.as_ptr(),
            stride as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    ops::softmax_rows(&mut s, n);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            n,
            hd,
            n,
            out.as_mut_ptr(),
            1,
            hd as isize,
            false,
            s.as_ptr(),
            1,
            n as isize,
            v.as_ptr(),
            1,
            stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    out
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "cpu".into(),
            adapter: cpu_name(),
            driver: String::new(),
            device_type: "software".into(),
            api: "native".into(),
            limits: vec![("threads".into(), self.threads as u64)],
        }
    }

    fn upload(&mut self, weights: Arc<BertWeights>) -> Result<()> {
        check_weights(&weights)?;
        let c = &weights.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        self.transposed = if skinny::available() {
            weights
                .layers
                .iter()
                .map(|l| {
                    [
                        transpose(&l.qkv_w, h, 3 * h),
                        transpose(&l.attn_out_w, h, h),
                        transpose(&l.ff_in_w, h, i),
                        transpose(&l.ff_out_w, i, h),
                    ]
                })
                .collect()
        } else {
            Vec::new()
        };
        self.weights = Some(weights);
        Ok(())
    }

    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let w = self
            .weights
            .as_ref()
            .ok_or_else(|| InferenceError::Backend("no model uploaded".into()))?;
        check_batch(batch, w)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let groups = split_by_tokens(batch, self.threads);
        if groups.len() < 2 {
            return self.pool.install(|| self.forward(w, batch, self.threads));
        }
        // Sequences are independent through the whole encoder, so each
        // thread runs every layer on its own share with single-threaded
        // products: one fork-join per batch instead of several per layer,
        // whose wake-ups cost a quarter of the time of long batches.
        let parts = self.pool.install(|| {
            groups
                .par_iter()
                .map(|g| self.forward(w, g, 1))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(parts.into_iter().flatten().collect())
    }

    fn matmul(&self, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        self.pool.install(|| {
            let mut dst = vec![0.0; m * n];
            ops::matmul_bias_into(&mut dst, a, b, None, (m, k, n), self.threads)?;
            Ok(dst)
        })
    }
}

/// The CPU model name from /proc/cpuinfo where there is one.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(groups: &[&[Vec<u32>]]) -> Vec<Vec<usize>> {
        groups.iter().map(|g| g.iter().map(Vec::len).collect()).collect()
    }

    #[test]
    fn fast_exp_and_softmax_match_libm() {
        let mut worst = 0f32;
        for i in 0..=100_000 {
            let x = -88.0 * i as f32 / 100_000.0;
            let (got, want) = (ops::exp_nonpositive(x), x.exp());
            if want > 1e-30 {
                worst = worst.max(((got - want) / want).abs());
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
        let row: Vec<f32> = (0..77).map(|i| ((i * 37) % 23) as f32 * 0.7 - 5.0).collect();
        let mut fast = [row.clone(), row.clone()].concat();
        ops::softmax_rows(&mut fast, 77);
        let mut exact = row;
        ops::softmax_row(&mut exact);
        for (a, b) in fast[77..].iter().zip(&exact) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn batches_split_into_consecutive_groups_of_similar_token_counts() {
        let batch: Vec<Vec<u32>> = [100, 100, 200, 300, 300].iter().map(|&n| vec![0; n]).collect();
        assert_eq!(
            lens(&split_by_tokens(&batch, 2)),
            vec![vec![100, 100, 200], vec![300, 300]]
        );
        assert_eq!(lens(&split_by_tokens(&batch, 1)).len(), 1);
        // Too few tokens to be worth splitting.
        let small: Vec<Vec<u32>> = vec![vec![0; 12]; 32];
        assert_eq!(split_by_tokens(&small, 2).len(), 1);
        // Never more groups than sequences, and nothing lost.
        let two: Vec<Vec<u32>> = vec![vec![0; 4000]; 2];
        let groups = split_by_tokens(&two, 8);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 2);
    }
}
