//! The checkers against known-bad histories they must reject and known-good
//! ones they must accept, through the public API only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use cell0_chaos::checker::{Verdict, linearizable, set};
use cell0_chaos::history::{Op, OpKind, ReadConsistency, Status};

const BUDGET: Duration = Duration::from_secs(30);

fn op(kind: OpKind, key: &str, span: (u64, u64), status: Status) -> Op {
    Op {
        client: 0,
        kind,
        key: key.into(),
        consistency: None,
        value: None,
        expect: None,
        read: None,
        succeeded: None,
        invoke_us: span.0,
        complete_us: span.1,
        status,
        node: 0,
        error: None,
    }
}

/// A write of `value` to key "r" over `span`.
fn write(value: u64, span: (u64, u64), status: Status) -> Op {
    Op {
        value: Some(value),
        ..op(OpKind::Write, "r", span, status)
    }
}

/// An `ok` linearizable read of key "r" that found `found`.
fn read(found: Option<u64>, span: (u64, u64)) -> Op {
    Op {
        consistency: Some(ReadConsistency::Linearizable),
        read: Some(found),
        ..op(OpKind::Read, "r", span, Status::Ok)
    }
}

/// A compare-and-set of key "r" from `expect` to `new`.
fn cas(expect: Option<u64>, new: u64, succeeded: Option<bool>, span: (u64, u64), status: Status) -> Op {
    Op {
        expect,
        value: Some(new),
        succeeded,
        ..op(OpKind::Cas, "r", span, status)
    }
}

fn on(key: &str, mut op: Op) -> Op {
    op.key = key.into();
    op
}

fn check(ops: &[Op]) -> linearizable::Report {
    linearizable::check(ops, BUDGET)
}

#[track_caller]
fn assert_invalid(ops: &[Op], needle: &str) -> linearizable::Report {
    let report = check(ops);
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    let shown = report.to_string();
    assert!(shown.contains(needle), "expected {needle:?} in:\n{shown}");
    report
}

#[track_caller]
fn assert_ok(ops: &[Op]) -> linearizable::Report {
    let report = check(ops);
    assert_eq!(report.verdict, Verdict::Ok, "{report}");
    report
}

#[test]
fn a_stale_read_after_an_acknowledged_write_is_invalid() {
    let report = assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            write(2, (20, 30), Status::Ok),
            read(Some(1), (40, 50)),
        ],
        "stale",
    );
    // The fast check lists exactly the three operations involved.
    let key = &report.keys[0];
    assert_eq!(key.explanation.as_ref().unwrap().ops.lines.len(), 3, "{report}");
    // Reading "absent" after a write completed is stale too.
    assert_invalid(&[write(1, (0, 10), Status::Ok), read(None, (11, 20))], "absent");
}

#[test]
fn operations_touching_at_the_same_microsecond_are_concurrent() {
    assert_ok(&[write(1, (0, 10), Status::Ok), read(None, (10, 20))]);
    assert_ok(&[read(Some(1), (0, 10)), write(1, (10, 20), Status::Ok)]);
    assert_invalid(
        &[read(Some(1), (0, 9)), write(1, (10, 20), Status::Ok)],
        "before its write was invoked",
    );
}

#[test]
fn a_read_of_a_value_never_written_is_invalid() {
    assert_invalid(
        &[write(1, (0, 10), Status::Ok), read(Some(99), (20, 30))],
        "99, which no operation wrote",
    );
    // A value only a failed write wrote: the failed write took effect.
    assert_invalid(
        &[write(1, (0, 10), Status::Fail), read(Some(1), (20, 30))],
        "only a failed operation wrote",
    );
    // Even a serializable read cannot invent values.
    let mut stale = read(Some(7), (0, 10));
    stale.consistency = Some(ReadConsistency::Serializable);
    assert_invalid(&[stale], "a serializable read observed 7, which no operation wrote");
}

#[test]
fn two_reads_going_back_in_time_are_invalid() {
    // Caught by the fast check: 1 was written before 2 was.
    assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            write(2, (20, 100), Status::Ok),
            read(Some(2), (30, 40)),
            read(Some(1), (50, 60)),
        ],
        "stale",
    );
    // 1 was seen before 2 was written, and 2 was in effect before the
    // second read: caught by the fast check although the writes overlap.
    assert_invalid(
        &[
            write(1, (0, 100), Status::Ok),
            read(Some(1), (10, 20)),
            write(2, (30, 40), Status::Ok),
            read(Some(1), (50, 60)),
        ],
        "stale: 2 replaced it",
    );
    // Concurrent writes, both complete before the reads: only the search
    // sees it, and names the read that cannot be linearized.
    let report = assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            write(2, (0, 10), Status::Ok),
            read(Some(2), (20, 30)),
            read(Some(1), (40, 50)),
        ],
        "Wing & Gong",
    );
    let summary = &report.keys[0].explanation.as_ref().unwrap().summary;
    assert!(summary.contains("the shortest failing prefix"), "{report}");
    assert!(
        summary.contains("[40..50us client 0 node 0: read (linearizable) = 1, ok]"),
        "{report}"
    );
}

#[test]
fn concurrent_writes_may_be_read_in_either_order() {
    let writes = [write(1, (0, 100), Status::Ok), write(2, (0, 100), Status::Ok)];
    for (first, second) in [(1, 2), (2, 1)] {
        let mut ops = writes.to_vec();
        ops.push(read(Some(first), (10, 20)));
        ops.push(read(Some(second), (30, 40)));
        assert_ok(&ops);
    }
}

#[test]
fn a_lost_acknowledged_cas_is_invalid() {
    assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            cas(Some(1), 2, Some(true), (20, 30), Status::Ok),
            read(Some(1), (40, 50)),
        ],
        "stale",
    );
    assert_ok(&[
        write(1, (0, 10), Status::Ok),
        cas(Some(1), 2, Some(true), (20, 30), Status::Ok),
        read(Some(2), (40, 50)),
    ]);
}

#[test]
fn a_failed_cas_that_must_have_succeeded_is_invalid() {
    assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            cas(Some(1), 2, Some(false), (20, 30), Status::Ok),
        ],
        "Wing & Gong",
    );
    // With a concurrent write it may have lost the race.
    assert_ok(&[
        write(1, (0, 10), Status::Ok),
        write(3, (15, 40), Status::Ok),
        cas(Some(1), 2, Some(false), (20, 30), Status::Ok),
    ]);
    // A succeeded cas from a value the key did not hold.
    assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            cas(None, 2, Some(true), (20, 30), Status::Ok),
        ],
        "absent",
    );
}

#[test]
fn unknown_writes_count_iff_observed() {
    // Observed: it took effect.
    let report = assert_ok(&[write(1, (0, 10), Status::Unknown), read(Some(1), (20, 30))]);
    assert_eq!((report.counts.unknown_kept, report.counts.unknown_dropped), (1, 0));
    // Unobserved: it may not have.
    let report = assert_ok(&[
        write(1, (0, 10), Status::Ok),
        write(2, (20, 30), Status::Unknown),
        read(Some(1), (40, 50)),
    ]);
    assert_eq!((report.counts.unknown_kept, report.counts.unknown_dropped), (0, 1));
    // An unknown write may take effect long after its error came back.
    assert_ok(&[
        write(1, (0, 10), Status::Unknown),
        write(2, (0, 10), Status::Unknown),
        read(Some(2), (20, 30)),
        read(Some(1), (40, 50)),
    ]);
    // But not before it was sent, nor before a write it followed.
    assert_invalid(
        &[
            write(1, (0, 10), Status::Ok),
            write(2, (20, 30), Status::Unknown),
            read(Some(2), (40, 50)),
            read(Some(1), (60, 70)),
        ],
        "stale",
    );
    // Unobserved but needed: a failed "create if absent" proves something
    // was written, and only the unknown write can have been.
    assert_ok(&[
        write(5, (0, 10), Status::Unknown),
        cas(None, 6, Some(false), (20, 30), Status::Ok),
    ]);
    assert_invalid(
        &[
            write(5, (0, 10), Status::Fail),
            cas(None, 6, Some(false), (20, 30), Status::Ok),
        ],
        "Wing & Gong",
    );
}

#[test]
fn unknown_cas_counts_only_if_it_could_have_succeeded() {
    assert_ok(&[cas(None, 7, None, (0, 10), Status::Unknown), read(Some(7), (20, 30))]);
    // It expected 1, which the key never held.
    assert_invalid(
        &[cas(Some(1), 7, None, (0, 10), Status::Unknown), read(Some(7), (20, 30))],
        "Wing & Gong",
    );
    // A chain of unknowns: the observed cas needs the unknown write it
    // expected, though nothing observed that write's value directly.
    assert_ok(&[
        write(5, (0, 10), Status::Unknown),
        cas(Some(5), 6, None, (20, 30), Status::Unknown),
        read(Some(6), (40, 50)),
    ]);
    // A failed cas is dropped: its value cannot appear.
    assert_invalid(
        &[cas(None, 7, Some(false), (0, 10), Status::Ok), read(Some(7), (20, 30))],
        "only a failed operation wrote",
    );
}

#[test]
fn serializable_reads_are_skipped_and_counted() {
    let mut stale = read(None, (40, 50));
    stale.consistency = Some(ReadConsistency::Serializable);
    let report = assert_ok(&[write(1, (0, 10), Status::Ok), stale]);
    assert_eq!(report.counts.serializable_reads_skipped, 1);
    assert_eq!(report.counts.checked, 1);
}

#[test]
fn a_zero_budget_decides_nothing_that_needs_the_search() {
    let ops = [
        write(1, (0, 10), Status::Ok),
        read(Some(1), (20, 30)),
        on("bad", write(2, (0, 10), Status::Ok)),
        on("bad", read(Some(3), (20, 30))),
    ];
    let report = linearizable::check(&ops[..2], Duration::ZERO);
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert!(
        report.to_string().contains("not decided within the time budget"),
        "{report}"
    );
    // What the fast check proves needs no budget.
    let report = linearizable::check(&ops, Duration::ZERO);
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    assert_eq!(report.keys_with(Verdict::Unknown).count(), 1);
}

#[test]
fn keys_are_checked_independently() {
    // Alone, each key is fine; together they would not be a register.
    let ops = [
        on("a", write(1, (0, 10), Status::Ok)),
        on("b", write(2, (20, 30), Status::Ok)),
        on("a", read(Some(1), (40, 50))),
        on("b", read(Some(2), (40, 50))),
        on("c", write(3, (0, 10), Status::Ok)),
        on("c", write(4, (0, 10), Status::Ok)),
        on("c", read(Some(4), (20, 30))),
        on("c", read(Some(3), (40, 50))),
    ];
    let report = check(&ops);
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    let verdicts: Vec<(&str, Verdict)> = report.keys.iter().map(|k| (k.key.as_str(), k.verdict)).collect();
    assert_eq!(
        verdicts,
        [("a", Verdict::Ok), ("b", Verdict::Ok), ("c", Verdict::Invalid)]
    );
    let shown = report.to_string();
    assert!(
        shown.starts_with("linearizability: invalid: 3 keys (2 ok, 1 invalid, 0 unknown); 8 ops"),
        "{shown}"
    );
    assert!(shown.contains("key \"c\": invalid"), "{shown}");
    assert!(!shown.contains("key \"a\""), "{shown}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["verdict"], "invalid");
    assert_eq!(json["keys"][2]["verdict"], "invalid");
}

#[test]
fn malformed_records_leave_their_key_unknown() {
    let mut broken = write(1, (0, 10), Status::Ok);
    broken.value = None;
    let report = check(&[broken, on("fine", write(2, (0, 10), Status::Ok))]);
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert_eq!(report.counts.malformed, 1);
    assert!(report.to_string().contains("malformed"), "{report}");
}

#[test]
fn the_counts_add_up() {
    let mut serializable = read(Some(1), (60, 70));
    serializable.consistency = Some(ReadConsistency::Serializable);
    let mut failed_read = read(None, (60, 70));
    failed_read.status = Status::Fail;
    failed_read.read = None;
    let ops = [
        write(1, (0, 10), Status::Ok),
        write(2, (20, 30), Status::Unknown),
        write(3, (20, 30), Status::Unknown),
        write(4, (20, 30), Status::Fail),
        read(Some(2), (40, 50)),
        serializable,
        failed_read,
    ];
    let c = assert_ok(&ops).counts;
    assert_eq!(c.ops, 7);
    assert_eq!((c.checked, c.unknown_kept), (3, 1));
    assert_eq!(
        (
            c.serializable_reads_skipped,
            c.failed_dropped,
            c.unknown_dropped,
            c.malformed
        ),
        (1, 2, 1, 0)
    );
    assert_eq!(
        c.ops,
        c.checked + c.serializable_reads_skipped + c.failed_dropped + c.unknown_dropped + c.malformed
    );
}

#[test]
fn the_set_checker_rejects_lost_failed_and_phantom_keys() {
    let w = |key: &str, status| Op {
        key: key.into(),
        ..write(1, (0, 10), status)
    };
    let present = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect::<BTreeSet<_>>();
    let ops = [
        w("s/ok", Status::Ok),
        w("s/unknown-1", Status::Unknown),
        w("s/unknown-2", Status::Unknown),
        w("s/failed", Status::Fail),
    ];
    let good = set::check(&ops, &present(&["s/ok", "s/unknown-1"]));
    assert_eq!(good.verdict, Verdict::Ok, "{good}");
    assert_eq!((good.counts.unknown_present, good.counts.unknown_absent), (1, 1));

    let lost = set::check(&ops, &present(&["s/unknown-1"]));
    assert_eq!(
        (lost.verdict, lost.lost.as_slice()),
        (Verdict::Invalid, &["s/ok".to_owned()][..])
    );
    let zombie = set::check(&ops, &present(&["s/ok", "s/failed"]));
    assert_eq!(zombie.failed_but_present, ["s/failed"]);
    assert_eq!(zombie.verdict, Verdict::Invalid);
    let phantom = set::check(&ops, &present(&["s/ok", "s/never"]));
    assert_eq!(phantom.phantoms, ["s/never"]);
    assert_eq!(phantom.verdict, Verdict::Invalid);
    assert!(
        phantom
            .to_string()
            .contains("phantom (never written, present): s/never"),
        "{phantom}"
    );
}

#[test]
fn a_search_past_its_budget_is_unknown_and_check_returns_on_time() {
    // Fourteen concurrent writes read one by one, then the first value
    // again: invalid, but only an exhaustive search (seconds) shows it.
    let mut ops: Vec<Op> = (1..=14).map(|v| write(v, (0, 10_000), Status::Ok)).collect();
    ops.extend((1..=14).map(|v| read(Some(v), (v * 10, v * 10 + 5))));
    ops.push(read(Some(1), (5000, 5005)));
    let started = std::time::Instant::now();
    let report = linearizable::check(&ops, Duration::from_millis(100));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert!(
        report
            .to_string()
            .contains("not decided within the time budget (29 operations to search)"),
        "{report}"
    );
}
