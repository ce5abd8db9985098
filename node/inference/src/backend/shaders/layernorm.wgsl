// x[row] = LayerNorm(x[row] + residual[row]) · gamma + beta, one workgroup per
// row. Each thread owns columns t, t+128, ...; only the two reductions
// (mean, variance) cross threads, through workgroup memory, so no storage
// barrier is needed.

struct Params {
    rows: u32,
    cols: u32,
    eps_bits: u32,
    has_residual: u32,
    rows_per_dim: u32,
    _p1: u32,
    _p2: u32,
    _p3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> residual: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

const T: u32 = 128u;
var<workgroup> red: array<f32, 128>;

fn reduce_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = T / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(128, 1, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * p.rows_per_dim;
    let t = lid.x;
    // Uniform per workgroup, so the early exit keeps barriers in uniform control flow.
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var j = t; j < p.cols; j += T) {
        var v = x[base + j];
        if (p.has_residual != 0u) {
            v += residual[base + j];
            x[base + j] = v;
        }
        s += v;
    }
    let mean = reduce_sum(t, s) / f32(p.cols);
    var sq = 0.0;
    for (var j = t; j < p.cols; j += T) {
        let d = x[base + j] - mean;
        sq += d * d;
    }
    let variance = reduce_sum(t, sq) / f32(p.cols);
    let inv = 1.0 / sqrt(variance + bitcast<f32>(p.eps_bits));
    for (var j = t; j < p.cols; j += T) {
        x[base + j] = (x[base + j] - mean) * inv * gamma[j] + beta[j];
    }
}
