//! AFL++ binary of the `log_entry` fuzz target (cell0-fuzz).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        cell0_fuzz::log_entry(data);
    });
}
