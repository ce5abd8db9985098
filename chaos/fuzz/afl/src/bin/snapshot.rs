//! AFL++ binary of the `snapshot` fuzz target (cell0-fuzz).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        cell0_fuzz::snapshot(data);
    });
}
