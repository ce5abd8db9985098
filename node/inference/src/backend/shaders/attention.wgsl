// Multi-head scaled dot-product attention with a key padding mask, on a
// padded [batch, seq] layout. qkv rows hold Q | K | V (each `hidden` wide,
// heads contiguous). One thread per (batch, head, query row) streams over the
// keys with an online softmax (running max and sum), so scores never touch
// memory; keys whose mask is 0 get no weight, exactly like an additive -inf
// mask. Query rows that are padding write zeros. head_dim must be a
// multiple of 4 and at most 64 (checked on the host).

struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    hidden: u32,
    scale_bits: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> ctx: array<vec4<f32>>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let total = p.batch * p.heads * p.seq;
    if (idx >= total) {
        return;
    }
    let i = idx % p.seq;
    let bh = idx / p.seq;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let d4 = p.head_dim / 4u;
    let hid4 = p.hidden / 4u;
    let row4 = 3u * hid4;
    let out_base = (b * p.seq + i) * hid4 + h * d4;
    if (mask[b * p.seq + i] == 0u) {
        for (var d = 0u; d < d4; d++) {
            ctx[out_base + d] = vec4<f32>(0.0);
        }
        return;
    }
    let scale = bitcast<f32>(p.scale_bits);
    var q: array<vec4<f32>, 16>;
    var acc: array<vec4<f32>, 16>;
    let q_base = (b * p.seq + i) * row4 + h * d4;
    for (var d = 0u; d < d4; d++) {
        q[d] = qkv[q_base + d] * scale;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < p.seq; j++) {
        if (mask[b * p.seq + j] == 0u) {
            continue;
        }
        let k_base = (b * p.seq + j) * row4 + hid4 + h * d4;
        var s4 = vec4<f32>(0.0);
        for (var d = 0u; d < d4; d++) {
            s4 = fma(q[d], qkv[k_base + d], s4);
        }
        let s = s4.x + s4.y + s4.z + s4.w;
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let e = exp(s - m_new);
        l = l * corr + e;
        let v_base = k_base + hid4;
        for (var d = 0u; d < d4; d++) {
            acc[d] = fma(acc[d], vec4<f32>(corr), qkv[v_base + d] * e);
        }
        m = m_new;
    }
    let inv = 1.0 / l;
    for (var d = 0u; d < d4; d++) {
        ctx[out_base + d] = acc[d] * inv;
    }
}
