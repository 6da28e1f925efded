//! Names the commit the binary was built from in `kiln --version`: `0.1.0 (abc1234)`
//! in a git checkout, plain `0.1.0` outside one (a source archive) or without git.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let text = match git(&manifest_dir, &["rev-parse", "--short", "HEAD"]) {
        Some(commit) => format!("{version} ({commit})"),
        None => version,
    };
    println!("cargo:rustc-env=KILN_VERSION={text}");
    println!("cargo:rerun-if-changed=build.rs");
    // A new commit or another branch checked out changes the version: watch what HEAD
    // names. Only files that exist are named, or cargo would run this every build.
    let mut watched = Vec::new();
    if let Some(git_dir) = git(&manifest_dir, &["rev-parse", "--absolute-git-dir"]) {
        watched.push(Path::new(&git_dir).join("HEAD"));
    }
    let common_dir = git(
        &manifest_dir,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
    );
    let head_ref = git(
        &manifest_dir,
        &["rev-parse", "--symbolic-full-name", "HEAD"],
    );
    if let (Some(common_dir), Some(head_ref)) = (common_dir, head_ref) {
        let common_dir = Path::new(&common_dir);
        if head_ref.starts_with("refs/") {
            watched.push(common_dir.join(&head_ref));
        }
        watched.push(common_dir.join("packed-refs"));
    }
    for path in watched.iter().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The trimmed output of `git ARGS` run in `dir`, or `None` when git is missing, fails
/// (not a checkout) or says nothing.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
