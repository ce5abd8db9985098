//! Writes the seeds of a fuzz target into a directory: `seeds TARGET DIR`.

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(target), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: seeds TARGET DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        std::process::exit(1);
    }
    // AFL++ skips empty files; the tests run the empty seed.
    for (i, seed) in cell0_fuzz::seeds(&target).iter().filter(|s| !s.is_empty()).enumerate() {
        let path = dir.join(format!("seed-{i}"));
        if let Err(e) = std::fs::write(&path, seed) {
            eprintln!("cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
