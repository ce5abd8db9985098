//! Every seed and every kept input (`corpus/<target>/`, crashes found by
//! AFL and fixed) of every fuzz target goes through it without a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = cell0_fuzz::seeds(target)
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("seed {i}"), s))
        .collect();
    all.extend(cell0_fuzz::corpus(Path::new(env!("CARGO_MANIFEST_DIR")), target));
    assert!(!all.is_empty(), "{target} has no inputs");
    all
}

#[test]
fn log_entries_of_the_corpus_decode_and_apply_without_panics() {
    for (name, data) in inputs("log_entry") {
        eprintln!("log_entry {name}");
        cell0_fuzz::log_entry(&data);
    }
}

#[test]
fn snapshots_of_the_corpus_read_without_panics() {
    let seeds = cell0_fuzz::seeds("snapshot");
    // The seed is a valid file: every row reads.
    let mut reader = cell0_storage::snapshot::SnapshotReader::from_reader(
        std::io::Cursor::new(&seeds[0]),
        Path::new("seed"),
        seeds[0].len() as u64,
    )
    .unwrap();
    let mut rows = 0;
    while reader.next_row().unwrap().is_some() {
        rows += 1;
    }
    assert_eq!(rows, 3);
    for (name, data) in inputs("snapshot") {
        eprintln!("snapshot {name}");
        cell0_fuzz::snapshot(&data);
        // Every truncation of a valid file is refused cleanly too.
        if name.starts_with("seed") {
            for len in 0..data.len() {
                cell0_fuzz::snapshot(&data[..len]);
            }
        }
    }
}

#[test]
fn configs_of_the_corpus_parse_without_panics() {
    let seed = cell0_fuzz::seeds("config").remove(0);
    let config = cell0::config::NodeConfig::from_toml(std::str::from_utf8(&seed).unwrap(), "seed").unwrap();
    config.validate().unwrap();
    for (name, data) in inputs("config") {
        eprintln!("config {name}");
        cell0_fuzz::config(&data);
    }
}

#[test]
fn requests_of_the_corpus_are_answered_without_panics() {
    let target = cell0_fuzz::RequestTarget::start();
    // The node answers: the seed put (management token) is written, the
    // same without a token is refused.
    let put = cell0_fuzz::seeds("request").remove(0);
    assert_eq!(target.run(&put), Some(tonic::Code::Ok));
    let mut anonymous = put.clone();
    anonymous[1] = 0;
    assert_eq!(target.run(&anonymous), Some(tonic::Code::Unauthenticated));
    for (name, data) in inputs("request") {
        eprintln!("request {name}");
        target.run(&data);
    }
}
