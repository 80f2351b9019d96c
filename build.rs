//! Records the git commit segctl is built from (when built from a checkout) and the target
//! triple, for `segctl --version`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let git_dir = Path::new(&manifest).join(".git");
    if git_dir.exists() {
        // A new commit changes HEAD or the branch it points to.
        for path in ["HEAD", "packed-refs"] {
            if git_dir.join(path).exists() {
                println!("cargo:rerun-if-changed=.git/{path}");
            }
        }
        if let Some(reference) = std::fs::read_to_string(git_dir.join("HEAD")).ok().and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string())) {
            if git_dir.join(&reference).exists() {
                println!("cargo:rerun-if-changed=.git/{reference}");
            }
        }
        if let Some(commit) = git(&["-C", &manifest, "rev-parse", "HEAD"]) {
            println!("cargo:rustc-env=SEGCTL_GIT_COMMIT={commit}");
        }
    }
    println!("cargo:rustc-env=SEGCTL_TARGET={}", std::env::var("TARGET").unwrap_or_default());
    println!("cargo:rerun-if-changed=build.rs");
}
