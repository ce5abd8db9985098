//! Crash points for tests of crash safety: a process started with
//! `CELL0_CRASH_AT=NAME:BYTES` aborts (no unwinding, no cleanup, like
//! `kill -9` as far as its files are concerned) the first time the named
//! operation has moved at least BYTES bytes. Unset (always, outside tests),
//! a point costs one load of a cached value.
//!
//! Points: [`SNAPSHOT_RECEIVE`] (bytes of a snapshot received into its
//! file) and [`SNAPSHOT_LOAD`] (bytes of rows loaded into the staging
//! keyspace while installing).

use std::sync::OnceLock;

/// Bytes of an incoming snapshot written to its file.
pub const SNAPSHOT_RECEIVE: &str = "snapshot-receive";
/// Bytes of snapshot rows loaded into the staging keyspace.
pub const SNAPSHOT_LOAD: &str = "snapshot-load";

/// The environment variable that arms a point.
pub const ENV: &str = "CELL0_CRASH_AT";

fn armed() -> Option<&'static (String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (name, bytes) = spec.split_once(':')?;
            Some((name.to_string(), bytes.parse().ok()?))
        })
        .as_ref()
}

/// Aborts the process when `name` is armed and `moved` reached its bytes.
pub(crate) fn point(name: &str, moved: u64) {
    if let Some((armed, at)) = armed()
        && armed == name
        && moved >= *at
    {
        eprintln!("{ENV}: crashing at {name} after {moved} bytes");
        std::process::abort();
    }
}
