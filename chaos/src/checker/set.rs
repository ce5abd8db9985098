//! The set workload's checker.
//!
//! The workload writes unique keys under one prefix (one write per key)
//! and, at the end, reads the whole prefix once, linearizably: the keys
//! present then are the set. Every key's fate is decided by the statuses
//! of the writes of it (if a workload wrote a key more than once, an `ok`
//! write of it wins over `unknown`, which wins over `fail`):
//!
//! | writes of the key | present           | absent              |
//! |-------------------|-------------------|---------------------|
//! | an `ok` one       | fine              | **lost** (Invalid)  |
//! | `unknown` only    | fine (counted)    | fine (counted)      |
//! | `fail` only       | **failed but present** (Invalid) | fine |
//! | none              | **phantom** (Invalid) | —               |
//!
//! Invariant: the verdict is `Invalid` iff one of the three lists is not
//! empty, else `Ok`; the check is exact given the history's promises (an
//! acknowledged write is durable, `fail` did not take effect) and that the
//! final read happened after every write completed. Operations other than
//! writes are counted and ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{Verdict, capped_list};
use crate::history::{Op, OpKind, Status};

/// How many keys ended how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SetCounts {
    /// Keys written.
    pub keys_written: usize,
    /// Acknowledged keys, present.
    pub ok_present: usize,
    /// Keys whose write's outcome is unknown, present.
    pub unknown_present: usize,
    /// Keys whose write's outcome is unknown, absent.
    pub unknown_absent: usize,
    /// Keys whose write failed, absent.
    pub failed_absent: usize,
    /// Operations that are not writes, ignored.
    pub ignored_ops: usize,
}

/// The verdict on a set workload's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetReport {
    /// `Invalid` iff a key is lost, failed but present, or a phantom.
    pub verdict: Verdict,
    /// Keys written `ok` but absent: lost acknowledged writes.
    pub lost: Vec<String>,
    /// Keys whose writes all failed but which are present.
    pub failed_but_present: Vec<String>,
    /// Keys present that no operation wrote.
    pub phantoms: Vec<String>,
    /// How the other keys ended.
    pub counts: SetCounts,
}

impl fmt::Display for SetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "set: {}: {} keys written: {} ok present, {} unknown present, {} unknown absent, {} failed absent; \
             {} lost, {} failed but present, {} phantom ({} other ops ignored)",
            self.verdict,
            c.keys_written,
            c.ok_present,
            c.unknown_present,
            c.unknown_absent,
            c.failed_absent,
            self.lost.len(),
            self.failed_but_present.len(),
            self.phantoms.len(),
            c.ignored_ops
        )?;
        for (what, keys) in [
            ("lost (acknowledged, absent)", &self.lost),
            ("failed but present", &self.failed_but_present),
            ("phantom (never written, present)", &self.phantoms),
        ] {
            if !keys.is_empty() {
                writeln!(f, "  {what}: {}", capped_list(keys))?;
            }
        }
        Ok(())
    }
}

/// What the writes of one key promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// Every write of it failed: it must be absent.
    Failed,
    /// Some write's outcome is unknown (none acknowledged): either.
    Unknown,
    /// A write of it was acknowledged: it must be present.
    Acknowledged,
}

/// Checks the writes of a set workload (`ops`) against the keys the final
/// read found (`present`).
pub fn check(ops: &[Op], present: &BTreeSet<String>) -> SetReport {
    let mut counts = SetCounts::default();
    let mut fates: BTreeMap<&str, Fate> = BTreeMap::new();
    for op in ops {
        if op.kind != OpKind::Write {
            counts.ignored_ops += 1;
            continue;
        }
        let fate = match op.status {
            Status::Ok => Fate::Acknowledged,
            Status::Unknown => Fate::Unknown,
            Status::Fail => Fate::Failed,
        };
        fates
            .entry(op.key.as_str())
            .and_modify(|f| *f = (*f).max(fate))
            .or_insert(fate);
    }
    counts.keys_written = fates.len();
    let mut report = SetReport {
        verdict: Verdict::Ok,
        lost: Vec::new(),
        failed_but_present: Vec::new(),
        phantoms: Vec::new(),
        counts,
    };
    for (&key, &fate) in &fates {
        let is_present = present.contains(key);
        match (fate, is_present) {
            (Fate::Acknowledged, true) => report.counts.ok_present += 1,
            (Fate::Acknowledged, false) => report.lost.push(key.to_owned()),
            (Fate::Unknown, true) => report.counts.unknown_present += 1,
            (Fate::Unknown, false) => report.counts.unknown_absent += 1,
            (Fate::Failed, true) => report.failed_but_present.push(key.to_owned()),
            (Fate::Failed, false) => report.counts.failed_absent += 1,
        }
    }
    report.phantoms = present
        .iter()
        .filter(|key| !fates.contains_key(key.as_str()))
        .cloned()
        .collect();
    if !(report.lost.is_empty() && report.failed_but_present.is_empty() && report.phantoms.is_empty()) {
        report.verdict = Verdict::Invalid;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, status: Status) -> Op {
        Op {
            client: 0,
            kind: OpKind::Write,
            key: key.into(),
            consistency: None,
            value: Some(1),
            expect: None,
            read: None,
            succeeded: None,
            invoke_us: 0,
            complete_us: 1,
            status,
            node: 0,
            error: None,
        }
    }

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn every_fate_of_a_key() {
        let ops = [
            write("ok", Status::Ok),
            write("unknown-in", Status::Unknown),
            write("unknown-out", Status::Unknown),
            write("failed-out", Status::Fail),
        ];
        let report = check(&ops, &set(&["ok", "unknown-in"]));
        assert_eq!(report.verdict, Verdict::Ok, "{report}");
        let c = report.counts;
        assert_eq!(
            (
                c.keys_written,
                c.ok_present,
                c.unknown_present,
                c.unknown_absent,
                c.failed_absent
            ),
            (4, 1, 1, 1, 1)
        );
    }

    #[test]
    fn lost_failed_but_present_and_phantom_keys_are_invalid() {
        let ops = [
            write("lost", Status::Ok),
            write("zombie", Status::Fail),
            write("kept", Status::Ok),
        ];
        let report = check(&ops, &set(&["kept", "zombie", "ghost"]));
        assert_eq!(report.verdict, Verdict::Invalid);
        assert_eq!(report.lost, ["lost"]);
        assert_eq!(report.failed_but_present, ["zombie"]);
        assert_eq!(report.phantoms, ["ghost"]);
        let shown = report.to_string();
        assert!(shown.starts_with("set: invalid: 3 keys written"), "{shown}");
        assert!(shown.contains("lost (acknowledged, absent): lost\n"), "{shown}");
    }

    #[test]
    fn an_acknowledged_retry_outranks_a_failed_write_of_the_same_key() {
        let ops = [write("k", Status::Fail), write("k", Status::Ok)];
        assert_eq!(check(&ops, &set(&[])).lost, ["k"]);
        assert_eq!(check(&ops, &set(&["k"])).verdict, Verdict::Ok);
    }
}
