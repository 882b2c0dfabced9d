//! Replays the fuzz corpus (engine/fuzz/corpus, grown by `cargo fuzz run`
//! and kept in the repository) through the same entry points as the fuzz
//! targets, so every input a fuzzer found interesting, and every crash it
//! found, stays a test.

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            panic!("{target}: {} fails", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "the {target} corpus is empty");
    n
}

#[test]
fn the_fuzz_corpus_replays_cleanly() {
    use herald::proto::fuzz;
    for (target, f) in [
        ("command", fuzz::command as fn(&[u8])),
        ("frames", fuzz::frames),
        ("resp", fuzz::resp),
        ("encoders", fuzz::encoders),
        ("tokens", fuzz::tokens),
        ("deflate", fuzz::deflate),
    ] {
        let n = replay(target, f);
        eprintln!("{target}: {n} inputs");
    }
}
