//! AFL++ binary of the `config` fuzz target (cell0-fuzz).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        cell0_fuzz::config(data);
    });
}
