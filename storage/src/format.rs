//! The data dir's format, and its upgrade when an older one is opened.
//!
//! One number in [`Cf::Meta`] says how the records of the whole data dir are
//! laid out. What each format means:
//! - none (data dirs written before the number existed): state rows are
//!   bare postcard bodies;
//! - 1: every state row starts with its layout byte (`cell0_state::codec`);
//!   log entries and the `Cf::Meta` records are as before.
//! - 2: the stored snapshot is a file in the snapshot directory, recorded
//!   by name in `Cf::Meta`, instead of a whole payload in `Cf::Meta`; state
//!   rows may live in either physical state keyspace (see `engine`).
//!
//! Opening a data dir of an older format upgrades it in one atomic write
//! before anything reads it (the rows of format none become layout 1); a
//! format newer than [`DATA_FORMAT`] is refused with an error that says so,
//! so an older build never misreads a newer data dir. The upgrade from none
//! holds every state row in one write batch: data dirs that old were bounded
//! by an in-memory snapshot anyway.

use cell0_state::codec::frame_unversioned;

use crate::engine::{Cf, Durability, Engine, WriteBatch, scan_all};
use crate::{Error, Result};

/// The format this build writes.
pub const DATA_FORMAT: u32 = 2;
const FORMAT_KEY: &[u8] = b"format";

/// Brings `engine`'s data dir to [`DATA_FORMAT`], refusing a newer one.
/// `move_snapshot` adds to the upgrade's batch the move of a snapshot stored
/// whole into a file (format 2).
pub(crate) fn upgrade<E: Engine>(
    engine: &E,
    move_snapshot: &mut dyn FnMut(&mut WriteBatch) -> Result<()>,
) -> Result<()> {
    let found = match engine.get(Cf::Meta, FORMAT_KEY)? {
        Some(b) => {
            let arr: [u8; 4] = b.as_slice().try_into().map_err(|_| Error::Corrupt {
                what: "data dir format",
                detail: format!("{} bytes, not 4", b.len()),
            })?;
            Some(u32::from_be_bytes(arr))
        }
        None => None,
    };
    match found {
        Some(DATA_FORMAT) => Ok(()),
        Some(newer) if newer > DATA_FORMAT => Err(Error::NewerFormat {
            found: newer,
            newest: DATA_FORMAT,
        }),
        older => {
            let mut batch = WriteBatch::new();
            let mut upgraded = 0;
            if older.is_none() {
                let rows = scan_all(engine, Cf::State)?;
                upgraded = rows.len();
                for (k, v) in rows {
                    batch.put(Cf::State, k, frame_unversioned(&v));
                }
            }
            move_snapshot(&mut batch)?;
            batch.put(Cf::Meta, FORMAT_KEY, DATA_FORMAT.to_be_bytes().to_vec());
            engine.write(batch, Durability::Sync)?;
            if upgraded > 0 {
                tracing::info!(
                    rows = upgraded,
                    format = DATA_FORMAT,
                    "upgraded the data dir's state rows"
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemEngine, ReadView as _};

    #[test]
    fn an_unversioned_data_dir_is_framed_once_and_a_newer_one_refused() {
        let engine = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::State, b"kv\0a".to_vec(), b"body".to_vec());
        engine.write(b, Durability::Sync).unwrap();
        upgrade(&engine, &mut |_| Ok(())).unwrap();
        upgrade(&engine, &mut |_| Ok(())).unwrap();
        assert_eq!(engine.get(Cf::State, b"kv\0a").unwrap(), Some(b"\x01body".to_vec()));

        let mut b = WriteBatch::new();
        b.put(Cf::Meta, FORMAT_KEY.to_vec(), (DATA_FORMAT + 1).to_be_bytes().to_vec());
        engine.write(b, Durability::Sync).unwrap();
        let err = upgrade(&engine, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::NewerFormat { .. }), "{err}");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }
}
