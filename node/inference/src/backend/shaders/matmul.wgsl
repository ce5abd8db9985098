// C[m, n] = A[m, k] · W[k, n] + bias[n], optionally followed by exact GELU.
// A and C are row-major f32; W is row-major with rows padded to n4 = ceil(n/4)
// vec4s (zero-filled) so its tile loads are aligned vec4 loads; bias is padded
// the same way. A workgroup of 16×16 threads computes a 64×64 tile of C, each
// thread a 4×4 register block, stepping through k in slices of 16 staged in
// workgroup memory. Out-of-range rows/columns/k are zero-filled on load and
// skipped on store, so any shape works.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    gelu: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    _p3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

// as_tile[kk * 16 + r4] holds rows 4*r4 .. 4*r4+3 of the A tile at depth kk.
var<workgroup> as_tile: array<vec4<f32>, 256>;
// bs_tile[kk * 16 + c4] holds columns 4*c4 .. 4*c4+3 of the W tile at depth kk.
var<workgroup> bs_tile: array<vec4<f32>, 256>;

fn erf_approx(x_in: f32) -> f32 {
    // Rational approximation used by Eigen/XLA for f32 (|error| < 1e-7);
    // identical to the CPU engine's.
    let x = clamp(x_in, -4.0, 4.0);
    let x2 = x * x;
    var pp = fma(x2, -2.72614225801306e-10, 2.77068142495902e-08);
    pp = fma(x2, pp, -2.10102402082508e-06);
    pp = fma(x2, pp, -5.69250639462346e-05);
    pp = fma(x2, pp, -7.34990630326855e-04);
    pp = fma(x2, pp, -2.95459980854025e-03);
    pp = fma(x2, pp, -1.60960333262415e-02);
    pp = pp * x;
    var q = fma(x2, -1.45660718464996e-05, -2.13374055278905e-04);
    q = fma(x2, q, -1.68282697438203e-03);
    q = fma(x2, q, -7.37332916720468e-03);
    q = fma(x2, q, -1.42647390514189e-02);
    return pp / q;
}

fn gelu4(v: vec4<f32>) -> vec4<f32> {
    let s = 0.70710678118654752;
    return 0.5 * v * (vec4<f32>(1.0) + vec4<f32>(erf_approx(v.x * s), erf_approx(v.y * s), erf_approx(v.z * s), erf_approx(v.w * s)));
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let row0 = wid.y * BM;
    let col4_0 = wid.x * (BN / 4u);
    let n4 = (p.n + 3u) / 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    // A-tile loader role: row ar of the tile, depths 4*akq .. 4*akq+3.
    let ar = tid % BM;
    let akq = tid / BM;
    let a_row = row0 + ar;
    // W-tile loader role: depth bk, column group bc4.
    let bk = tid / 16u;
    let bc4 = tid % 16u;

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        var av = vec4<f32>(0.0);
        for (var j = 0u; j < 4u; j++) {
            let gk = k0 + akq * 4u + j;
            if (a_row < p.m && gk < p.k) {
                av[j] = a[a_row * p.k + gk];
            }
        }
        for (var j = 0u; j < 4u; j++) {
            as_tile[(akq * 4u + j) * 16u + ar / 4u][ar % 4u] = av[j];
        }
        let gk = k0 + bk;
        let gc4 = col4_0 + bc4;
        var bv = vec4<f32>(0.0);
        if (gk < p.k && gc4 < n4) {
            bv = w[gk * n4 + gc4];
        }
        bs_tile[bk * 16u + bc4] = bv;
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let b = bs_tile[kk * 16u + tx];
            let a4 = as_tile[kk * 16u + ty];
            acc0 = fma(vec4<f32>(a4.x), b, acc0);
            acc1 = fma(vec4<f32>(a4.y), b, acc1);
            acc2 = fma(vec4<f32>(a4.z), b, acc2);
            acc3 = fma(vec4<f32>(a4.w), b, acc3);
        }
        workgroupBarrier();
    }

    let c4 = col4_0 + tx;
    if (c4 >= n4) {
        return;
    }
    let bvec = bias[c4];
    let col = c4 * 4u;
    var accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty * 4u + i;
        if (row >= p.m) {
            break;
        }
        var v = accs[i] + bvec;
        if (p.gelu != 0u) {
            v = gelu4(v);
        }
        for (var j = 0u; j < 4u; j++) {
            if (col + j < p.n) {
                c[row * p.n + col + j] = v[j];
            }
        }
    }
}
