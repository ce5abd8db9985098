//! The one encoding of rows, log payloads and internal messages: postcard,
//! with errors that name what was being read or written. Every crate
//! encodes through here.
//!
//! Versions, by kind of bytes (docs/architecture.md, "Versioned encodings"):
//! - **Table rows** start with one layout byte, then the postcard body
//!   ([`encode_row`], [`decode_row`]). A [`Row`] type names the layout it
//!   writes and migrates every older one into it when read (Garage's
//!   `Migrate`), so adding a field to a row is a new layout plus a
//!   `migrate` arm, and rows written by earlier builds still decode. Data
//!   dirs from before rows carried the byte are framed once when opened
//!   ([`frame_unversioned`]): their bodies are layout 1.
//! - **Log entries and internal messages** are postcard enums whose variant
//!   index is the version: existing variants and every type nested in them
//!   are frozen (never reorder, remove or change a field); a change adds a
//!   variant carrying a new type and converts the old one where it is
//!   applied. Checked-in golden bytes fail CI when a frozen layout changes.
//!   The envelope of every internal message also names the message format
//!   it was written in, and a node refuses a newer one than it knows.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StateError};

/// Encodes `v`; naming `what` if it fails (a bug).
///
/// The encoding is measured first and written into a buffer of exactly its
/// size. Grown from empty, a buffer doubles its way there: seven
/// allocations for a row holding a 256-byte value, each copying what was
/// written so far, thirteen for the log entry of a group of 80 such puts.
pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>> {
    let len = encoded_len(what, v)?;
    postcard::to_extend(v, Vec::with_capacity(len)).map_err(|e| encode_error(what, e))
}

/// The length of `v`'s encoding, without writing it.
pub fn encoded_len<T: Serialize>(what: &'static str, v: &T) -> Result<usize> {
    postcard::experimental::serialized_size(v).map_err(|e| encode_error(what, e))
}

/// Encodes `v` as a row of layout `version`: the layout byte, then the
/// body, written into one buffer of exactly their size.
pub fn encode_framed<T: Serialize>(what: &'static str, version: u8, v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(1 + encoded_len(what, v)?);
    out.push(version);
    postcard::to_extend(v, out).map_err(|e| encode_error(what, e))
}

fn encode_error(what: &'static str, e: postcard::Error) -> StateError {
    StateError::Encode {
        what,
        detail: e.to_string(),
    }
}

/// Decodes a stored `what`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StateError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// Decodes a `what` from the front of `bytes`, ignoring what follows it
/// (postcard writes struct fields in order with no framing, so this reads
/// the first fields of a larger record).
pub fn decode_prefix<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::take_from_bytes(bytes)
        .map(|(v, _rest)| v)
        .map_err(|e| StateError::Corrupt {
            what,
            detail: e.to_string(),
        })
}

/// A table row with a versioned layout.
pub trait Row: Sized {
    /// What the row is, for error messages.
    const WHAT: &'static str;
    /// The layout this build writes; starts at 1 and only grows.
    const VERSION: u8;

    /// The body of the current layout.
    fn encode_body(&self) -> Result<Vec<u8>>;

    /// The whole row: the layout byte, then the body.
    fn encode_framed(&self) -> Result<Vec<u8>> {
        Ok(frame(Self::VERSION, &self.encode_body()?))
    }

    /// Decodes a body written in layout `version` (at most
    /// [`Row::VERSION`]), migrating an older layout into the current one.
    fn decode_body(version: u8, body: &[u8]) -> Result<Self>;
}

/// Implements [`Row`] for a serde type whose only layout so far is 1.
#[macro_export]
macro_rules! row_v1 {
    ($ty:ty, $what:literal) => {
        impl $crate::codec::Row for $ty {
            const WHAT: &'static str = $what;
            const VERSION: u8 = 1;

            fn encode_body(&self) -> $crate::Result<Vec<u8>> {
                $crate::codec::encode($what, self)
            }

            fn encode_framed(&self) -> $crate::Result<Vec<u8>> {
                $crate::codec::encode_framed($what, 1, self)
            }

            fn decode_body(_version: u8, body: &[u8]) -> $crate::Result<Self> {
                $crate::codec::decode($what, body)
            }
        }
    };
}

/// Serde for a `Vec<u8>` field as one byte string
/// (`#[serde(with = "crate::codec::bytes")]`). Postcard writes a byte string
/// exactly as it writes a sequence of `u8` (a varint length, then the
/// bytes), so the encoding does not change; but it is written and read as
/// one slice instead of one serializer call per byte (measured: those calls
/// were about 4 % of a node's CPU under a write load of 256-byte values).
/// A format that hands over a sequence instead is read too.
pub mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;

    /// Writes `v` as one byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Reads a byte string, or a sequence of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(ByteBuf)
    }

    struct ByteBuf;

    /// Most bytes reserved up front for a sequence, whatever length it claims.
    const MAX_RESERVE: usize = 64 * 1024;

    impl<'de> Visitor<'de> for ByteBuf {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_RESERVE));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Encodes `row` as its layout byte followed by its body.
pub fn encode_row<T: Row>(row: &T) -> Result<Vec<u8>> {
    row.encode_framed()
}

/// Decodes a row written by [`encode_row`] in this or any earlier layout.
pub fn decode_row<T: Row>(bytes: &[u8]) -> Result<T> {
    let (version, body) = unframe(T::WHAT, T::VERSION, bytes)?;
    T::decode_body(version, body)
}

/// Decodes `V`, a view borrowing from `bytes`, of a row of `R` stored in
/// `R`'s current layout; `None` for a row in an earlier layout, which only
/// [`decode_row`] migrates. `V` must read the current layout's body.
pub fn decode_row_view<'b, R: Row, V: Deserialize<'b>>(bytes: &'b [u8]) -> Result<Option<V>> {
    let (version, body) = unframe(R::WHAT, R::VERSION, bytes)?;
    if version != R::VERSION {
        return Ok(None);
    }
    postcard::from_bytes(body).map(Some).map_err(|e| StateError::Corrupt {
        what: R::WHAT,
        detail: e.to_string(),
    })
}

/// The row of `table` at `key`, decoded.
pub(crate) fn get_row<T: Row>(txn: &dyn crate::Txn, table: &str, key: &[u8]) -> Result<Option<T>> {
    txn.get(table, key)?.map(|b| decode_row(&b)).transpose()
}

/// Every row of `table`, whose keys are node ids (8 bytes, big-endian), by
/// node id: one scan instead of a read per node.
pub(crate) fn rows_by_node<T: Row>(
    txn: &dyn crate::Txn,
    table: &str,
) -> Result<std::collections::BTreeMap<crate::NodeId, T>> {
    txn.scan(table, b"", None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            let id: [u8; 8] = k.as_slice().try_into().map_err(|_| StateError::Corrupt {
                what: "node key",
                detail: format!("{} bytes in {table}, not 8", k.len()),
            })?;
            Ok((crate::NodeId::from_be_bytes(id), decode_row(&v)?))
        })
        .collect()
}

/// A table whose rows are counted in a `meta` row, so that asking whether
/// it has any costs one read rather than a scan: a scan walks over every
/// deleted key RocksDB still holds, which for a queue-like table (rows put
/// and deleted all the time) grows until compaction. State written before
/// a count existed is counted once, on the first change.
pub(crate) struct Counted {
    /// The table.
    pub table: &'static str,
    /// Its count's key in `meta`.
    pub count_key: &'static [u8],
}

impl Counted {
    /// How many rows the table has.
    pub fn count(&self, txn: &dyn crate::Txn) -> Result<u64> {
        if txn.get(crate::kv::META_TABLE, self.count_key)?.is_some() {
            return crate::kv::meta_u64(txn, self.count_key);
        }
        Ok(txn.scan(self.table, b"", None, usize::MAX)?.len() as u64)
    }

    /// Puts `row` at `key`, counting it when it is new.
    pub fn put<T: Row>(&self, txn: &mut dyn crate::Txn, key: &[u8], row: &T) -> Result<()> {
        if txn.get(self.table, key)?.is_none() {
            let n = self.count(txn)?;
            crate::kv::put_meta_u64(txn, self.count_key, n + 1)?;
        }
        put_row(txn, self.table, key, row)
    }

    /// Deletes the row at `key`, if there is one (no tombstone otherwise);
    /// whether there was.
    pub fn delete(&self, txn: &mut dyn crate::Txn, key: &[u8]) -> Result<bool> {
        if txn.get(self.table, key)?.is_none() {
            return Ok(false);
        }
        let n = self.count(txn)?;
        crate::kv::put_meta_u64(txn, self.count_key, n.saturating_sub(1))?;
        txn.delete(self.table, key)?;
        Ok(true)
    }
}

/// Stores `row` in `table` at `key`, encoded.
pub(crate) fn put_row<T: Row>(txn: &mut dyn crate::Txn, table: &str, key: &[u8], row: &T) -> Result<()> {
    txn.put(table, key, encode_row(row)?)
}

/// The stored row of a data dir from before rows carried a layout byte: its
/// body is layout 1 of the same row.
pub fn frame_unversioned(body: &[u8]) -> Vec<u8> {
    frame(1, body)
}

/// `body` behind the layout byte `version`.
pub(crate) fn frame(version: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(version);
    out.extend_from_slice(body);
    out
}

/// Splits a stored row into its layout and body, refusing layouts this
/// build does not know (0, or newer than `newest`).
fn unframe<'b>(what: &'static str, newest: u8, bytes: &'b [u8]) -> Result<(u8, &'b [u8])> {
    match bytes.split_first() {
        None => Err(StateError::Corrupt {
            what,
            detail: "empty row".into(),
        }),
        Some((&0, _)) => Err(StateError::Corrupt {
            what,
            detail: "layout 0".into(),
        }),
        Some((&version, _)) if version > newest => Err(StateError::NewerLayout { what, version, newest }),
        Some((&version, body)) => Ok((version, body)),
    }
}

/// A big-endian u64 stored as a key part or a plain value (an id, a
/// counter); `what` names it if the bytes are not 8.
pub(crate) fn be_u64(what: &'static str, bytes: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StateError::Corrupt {
        what,
        detail: format!("{} bytes, not 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// A counter row: a big-endian u64 (layout 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter(pub u64);

impl Row for Counter {
    const WHAT: &'static str = "counter";
    const VERSION: u8 = 1;

    fn encode_body(&self) -> Result<Vec<u8>> {
        Ok(self.0.to_be_bytes().to_vec())
    }

    fn decode_body(_version: u8, body: &[u8]) -> Result<Self> {
        let arr: [u8; 8] = body.try_into().map_err(|_| StateError::Corrupt {
            what: Self::WHAT,
            detail: format!("{} bytes, not 8", body.len()),
        })?;
        Ok(Counter(u64::from_be_bytes(arr)))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsSeq {
        a: Vec<u8>,
        n: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsBytes {
        #[serde(with = "crate::codec::bytes")]
        a: Vec<u8>,
        n: u64,
    }

    #[test]
    fn byte_strings_keep_the_encoding_of_byte_sequences() {
        for a in [Vec::new(), b"k".to_vec(), (0..=255u8).cycle().take(300).collect()] {
            let seq = AsSeq { a: a.clone(), n: 7 };
            let bytes = AsBytes { a, n: 7 };
            let encoded = encode("test", &seq).unwrap();
            assert_eq!(encode("test", &bytes).unwrap(), encoded);
            assert_eq!(decode::<AsBytes>("test", &encoded).unwrap(), bytes);
        }
    }

    #[test]
    fn encodings_are_written_into_one_buffer_of_their_exact_size() {
        for value in [Vec::new(), vec![7u8; 256], vec![9u8; 70_000]] {
            let v = AsBytes { a: value, n: u64::MAX };
            let plain = encode("test", &v).unwrap();
            assert_eq!(plain.capacity(), plain.len());
            assert_eq!(encoded_len("test", &v).unwrap(), plain.len());
            let framed = encode_framed("test", 3, &v).unwrap();
            assert_eq!(framed.capacity(), framed.len());
            assert_eq!(framed[0], 3);
            assert_eq!(&framed[1..], &plain[..]);
        }
    }

    /// Layout 1 of a test row.
    #[derive(Serialize, Deserialize)]
    struct PointV1 {
        x: u32,
    }

    /// Layout 2 adds a field; layout-1 rows read with its default.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Point {
        x: u32,
        label: String,
    }

    impl Row for Point {
        const WHAT: &'static str = "point";
        const VERSION: u8 = 2;

        fn encode_body(&self) -> Result<Vec<u8>> {
            encode(Self::WHAT, self)
        }

        fn decode_body(version: u8, body: &[u8]) -> Result<Self> {
            match version {
                1 => {
                    let old: PointV1 = decode(Self::WHAT, body)?;
                    Ok(Point {
                        x: old.x,
                        label: String::new(),
                    })
                }
                _ => decode(Self::WHAT, body),
            }
        }
    }

    #[test]
    fn rows_of_older_layouts_migrate_and_newer_ones_are_refused() {
        let v1 = frame(1, &encode("point", &PointV1 { x: 7 }).unwrap());
        assert_eq!(
            decode_row::<Point>(&v1).unwrap(),
            Point {
                x: 7,
                label: String::new()
            }
        );
        let current = Point {
            x: 8,
            label: "a".into(),
        };
        let bytes = encode_row(&current).unwrap();
        assert_eq!(bytes[0], 2);
        assert_eq!(decode_row::<Point>(&bytes).unwrap(), current);

        let newer = frame(3, &bytes[1..]);
        let err = decode_row::<Point>(&newer).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::NewerLayout {
                    version: 3,
                    newest: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(decode_row::<Point>(&[]).is_err());
        assert!(decode_row::<Point>(&[0, 1]).is_err());
    }

    #[test]
    fn unversioned_rows_are_layout_one() {
        let body = 42u64.to_be_bytes();
        assert_eq!(decode_row::<Counter>(&frame_unversioned(&body)).unwrap(), Counter(42));
        assert_eq!(encode_row(&Counter(42)).unwrap(), frame_unversioned(&body));
    }
}
