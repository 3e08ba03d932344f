//! Every seed of `fuzz/corpus/<target>/` and every crash kept in `fuzz/regressions/<target>/`
//! goes through its target in the ordinary test run: a fixed bug stays fixed, on the stable
//! toolchain, without libFuzzer.

use std::path::Path;

#[test]
fn every_seed_and_every_kept_crash_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = 0;
    for (name, target) in shotover_fuzz::TARGETS {
        let mut of_target = 0;
        for folder in ["corpus", "regressions"] {
            let dir = root.join(folder).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            files.sort();
            for file in files {
                let data = std::fs::read(&file)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name} fails on {}", file.display());
                of_target += 1;
            }
        }
        assert!(of_target > 0, "{name} has no seeds in fuzz/corpus/{name}");
        seeds += of_target;
    }
    println!("{seeds} inputs replayed");
}
