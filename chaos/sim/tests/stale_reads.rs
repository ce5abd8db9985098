//! The simulator catches a broken read path: with the `stale-reads`
//! failpoint on (linearizable reads served from the local replica, without
//! a read index), the register checker must find a violation.
//!
//! The failpoint is switched for the whole process
//! (`cell0_consensus::failpoints::set_stale_reads`), which is why this test
//! is a test binary of its own: no other simulation shares its process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cell0_chaos::checker::Verdict;
use cell0_sim::{SimConfig, run_seed};

#[test]
fn stale_reads_are_caught_by_the_register_checker() {
    cell0_consensus::failpoints::set_stale_reads(Some(true));
    let config = SimConfig::default();
    // Followers lag the leader by a round trip, and an isolated member by
    // the whole partition: nearly every seed shows a stale read. Try a few,
    // so that one quiet schedule does not fail the test.
    let mut tried = Vec::new();
    for seed in 0..5 {
        let outcome = run_seed(seed, &config).unwrap();
        tried.push(format!("{outcome}"));
        if outcome.linearizable.verdict == Verdict::Invalid {
            eprintln!("{outcome}");
            assert_eq!(outcome.set.verdict, Verdict::Ok, "stale reads lose no write");
            return;
        }
    }
    panic!("no seed caught the stale reads:\n{}", tried.join(""));
}
