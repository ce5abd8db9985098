// x[t] = word[ids[t]] + pos[t % seq] + type[0] for a padded [batch, seq] grid
// of token ids, one workgroup per token. Layer norm follows as its own
// dispatch. Ids are range-checked on the host before upload.

struct Params {
    tokens: u32,
    seq: u32,
    hidden: u32,
    rows_per_dim: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    _p3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> word: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<f32>;
@group(0) @binding(4) var<storage, read> typ: array<f32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(128, 1, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x + wid.y * p.rows_per_dim;
    if (t >= p.tokens) {
        return;
    }
    let id = ids[t];
    let position = t % p.seq;
    for (var j = lid.x; j < p.hidden; j += 128u) {
        x[t * p.hidden + j] = word[id * p.hidden + j] + pos[position * p.hidden + j] + typ[j];
    }
}
