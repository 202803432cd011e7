//! scripts/install.sh and config/lanrage.service, as a newcomer runs them: staged with
//! `--destdir` (any user), and for real as root inside a private mount namespace whose /etc and
//! /usr/local are overlays on temp dirs (the host is never changed), where the installed unit
//! must pass `systemd-analyze verify`. The binaries are the ones cargo built for the tests
//! (`--from`), so no release build runs here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn built() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lanrage"))
        .parent()
        .expect("binary dir")
        .to_path_buf()
}

fn install(args: &[&str]) -> std::process::Output {
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args(args)
        .env_remove("SUDO_USER")
        .output()
        .expect("run scripts/install.sh");
    assert!(
        out.status.success(),
        "install.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Staged install: the binary (0755), the config with the operator group (0644) and the unit
/// naming the binary and the config where they are installed; a second run keeps an edited
/// config and changes nothing else.
#[test]
fn install_script_stages_the_daemon_config_and_unit_and_runs_again() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path().to_str().unwrap();
    let from = built();
    let out = install(&["--destdir", d, "--from", from.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sudo systemctl enable --now lanrage"),
        "{stdout}"
    );
    assert!(stdout.contains("sudo lanrage doctor"), "{stdout}");

    let bin = dest.path().join("usr/local/bin/lanrage");
    assert_eq!(mode(&bin), 0o755);
    let config = dest.path().join("etc/lanrage/lanrage.toml");
    assert_eq!(mode(&config), 0o644);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.lines().any(|l| l == "operator_group = \"lanrage\""),
        "the installed config enables the operator group"
    );
    // The installed config is a valid config with that group.
    let cfg = lanrage::config::Config::load(Some(&config), &[]).expect("installed config loads");
    assert_eq!(cfg.api.operator_group.as_deref(), Some("lanrage"));

    let unit_path = dest.path().join("etc/systemd/system/lanrage.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    // The unit runs the installed binary with the installed config, which is also the path the
    // daemon reads without --config.
    assert!(
        unit.lines().any(|l| l
            == format!(
                "ExecStart=/usr/local/bin/lanrage up --config {}",
                lanrage::config::DEFAULT_CONFIG_PATH
            )),
        "{unit}"
    );
    for key in ["StateDirectory=lanrage", "RuntimeDirectory=lanrage"] {
        assert!(unit.lines().any(|l| l == key), "{key} missing: {unit}");
    }
    assert!(
        unit.contains(&format!(
            "RuntimeDirectory=lanrage\nRuntimeDirectoryMode={:04o}",
            lanrage::api::token_file::DIR_MODE
        )),
        "{unit}"
    );

    // Again, with the config edited: kept; the rest is rewritten the same.
    std::fs::write(&config, format!("{text}\n# edited\n")).unwrap();
    install(&["--destdir", d, "--from", from.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .ends_with("# edited\n"));
    assert_eq!(std::fs::read_to_string(&unit_path).unwrap(), unit);

    // --prefix: the unit names the binary there.
    install(&[
        "--destdir",
        d,
        "--prefix",
        "/opt/lanrage",
        "--from",
        from.to_str().unwrap(),
    ]);
    assert_eq!(mode(&dest.path().join("opt/lanrage/bin/lanrage")), 0o755);
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/lanrage/bin/lanrage up --config"),
        "{unit}"
    );
}

/// As root, for real but inside a mount namespace whose /etc and /usr/local are overlays: the
/// script creates the group, installs everything in place, the unit passes `systemd-analyze
/// verify`, the installed CLI runs from the PATH, and a second run keeps the group and config.
#[test]
fn install_script_as_root_installs_a_unit_systemd_accepts() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (the install runs in a private mount namespace)");
        return;
    }
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("unshare") || !have("systemd-analyze") {
        eprintln!("SKIPPED: unshare (util-linux) or systemd-analyze (systemd) missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().display().to_string();
    let script = format!(
        r#"set -eu
mount --make-rprivate /
for d in etc usr-local; do mkdir -p {t}/$d-up {t}/$d-work; done
mount -t overlay overlay -o lowerdir=/etc,upperdir={t}/etc-up,workdir={t}/etc-work /etc
mount -t overlay overlay -o lowerdir=/usr/local,upperdir={t}/usr-local-up,workdir={t}/usr-local-work /usr/local
findmnt -n -o FSTYPE /etc | grep -qx overlay
findmnt -n -o FSTYPE /usr/local | grep -qx overlay
groupdel lanrage 2>/dev/null || true
bash {repo}/scripts/install.sh --from {from}
getent group lanrage
test "$(stat -c %a /usr/local/bin/lanrage)" = 755
systemd-analyze verify /etc/systemd/system/lanrage.service
/usr/local/bin/lanrage --version
bash {repo}/scripts/install.sh --from {from} > {t}/second.log
grep -q 'group lanrage exists' {t}/second.log
grep -q 'kept /etc/lanrage/lanrage.toml' {t}/second.log
echo INSTALLED-OK
"#,
        repo = repo().display(),
        from = built().display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "bash", "-c", &script])
        .env_remove("SUDO_USER")
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("overlay") && !stdout.contains("==>") {
        eprintln!("SKIPPED: no overlayfs here: {stderr}");
        return;
    }
    assert!(
        out.status.success() && stdout.contains("INSTALLED-OK"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("created the group lanrage"), "{stdout}");
    // Everything went to the overlays, none of it to the host.
    assert!(tmp.path().join("etc-up/lanrage/lanrage.toml").is_file());
    assert!(tmp
        .path()
        .join("etc-up/systemd/system/lanrage.service")
        .is_file());
    assert!(tmp.path().join("usr-local-up/bin/lanrage").is_file());
}
