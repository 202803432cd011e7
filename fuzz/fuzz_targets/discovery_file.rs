//! Reading a shared discovery file with arbitrary content (another machine may have written it).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use lanrage::discovery::file::DiscoveryFile;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("parties.json");
    if std::fs::write(&path, data).is_ok() {
        let _ = DiscoveryFile::new(path, Duration::from_secs(30)).read();
    }
});
