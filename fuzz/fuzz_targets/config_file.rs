//! Loading a config file with arbitrary content: must end in a config or an error, never a panic.
#![no_main]

use std::sync::OnceLock;

use lanrage::config::Config;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("lanrage.toml");
    if std::fs::write(&path, data).is_ok() {
        let _ = Config::load(Some(&path), &[]);
    }
});
