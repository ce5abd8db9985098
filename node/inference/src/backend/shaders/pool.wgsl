// out[b] = normalize(mean of x[b, t] over tokens t with mask 1), one
// workgroup per batch item. Each thread owns columns t, t+128, ... of the
// output and re-reads only what it wrote itself, so only the sum of squares
// crosses threads (through workgroup memory).

struct Params {
    batch: u32,
    seq: u32,
    hidden: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    _p3: u32,
    _p4: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const T: u32 = 128u;
var<workgroup> red: array<f32, 128>;

@compute @workgroup_size(128, 1, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x;
    let t = lid.x;
    if (b >= p.batch) {
        return;
    }
    var count = 0.0;
    for (var s = 0u; s < p.seq; s++) {
        if (mask[b * p.seq + s] != 0u) {
            count += 1.0;
        }
    }
    let inv_count = 1.0 / max(count, 1e-9);
    var sq = 0.0;
    for (var j = t; j < p.hidden; j += T) {
        var sum = 0.0;
        for (var s = 0u; s < p.seq; s++) {
            if (mask[b * p.seq + s] != 0u) {
                sum += x[(b * p.seq + s) * p.hidden + j];
            }
        }
        let mean = sum * inv_count;
        out[b * p.hidden + j] = mean;
        sq += mean * mean;
    }
    red[t] = sq;
    workgroupBarrier();
    for (var s = T / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    let inv_norm = 1.0 / max(sqrt(red[0]), 1e-12);
    for (var j = t; j < p.hidden; j += T) {
        out[b * p.hidden + j] = out[b * p.hidden + j] * inv_norm;
    }
}
