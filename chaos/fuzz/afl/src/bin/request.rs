//! AFL++ binary of the `request` fuzz target (cell0-fuzz). The node starts
//! on the first input, inside the process AFL++ forked (threads do not
//! survive a fork), and serves every later input of that process.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

fn main() {
    // Built with panic = "abort": nothing unwinds across the fuzz loop.
    let target: AssertUnwindSafe<OnceLock<cell0_fuzz::RequestTarget>> = AssertUnwindSafe(OnceLock::new());
    afl::fuzz!(|data: &[u8]| {
        let _ = target.get_or_init(cell0_fuzz::RequestTarget::start).run(data);
    });
}
