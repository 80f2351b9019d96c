use std::collections::HashMap;

use crate::util::*;

fn fetch_cmd(root: &std::path::Path, source: &str, sums: &std::path::Path) -> std::process::Command {
    let mut cmd = segctl();
    cmd.args(["fetch-data", "--json", "--set", "data.fetch.retry_backoff_ms=20", "--set", "data.fetch.timeout_s=10", "--root"])
        .arg(root)
        .args(["--source", source, "--checksums"])
        .arg(sums);
    cmd
}

#[test]
fn download_verify_extract_then_second_run_is_a_no_op() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 12);
    let server = FileServer::start(&archives, Faults::default());
    let root = work.path().join("pets");

    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["already_complete"], false);
    assert_eq!(report["archives"].as_array().unwrap().len(), 2);
    assert_eq!(std::fs::read_dir(root.join("images")).unwrap().count(), 12);
    assert_eq!(std::fs::read_dir(root.join("annotations/trimaps")).unwrap().count(), 12);
    let requests = server.seen().len();
    assert_eq!(requests, 2);

    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert!(out.status.success());
    assert_eq!(json(&out)["already_complete"], true);
    assert_eq!(server.seen().len(), requests, "a second run makes no request");

    let out = run(segctl().args(["fetch-data", "--root"]).arg(&root).args(["--source", &server.url(), "--checksums"]).arg(&sums));
    assert!(stdout(&out).contains("nothing to do"), "the no-op is said in words");

    let out = run(segctl().args(["validate", "--root"]).arg(&root));
    assert!(out.status.success(), "the fetched dataset validates");
}

#[test]
fn resumes_after_the_server_cuts_the_connection() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 12);
    let size = std::fs::metadata(archives.join("images.tar.gz")).unwrap().len() as usize;
    let cut = size / 3;
    let faults = Faults { cut_after: HashMap::from([("images.tar.gz".to_string(), cut)]), fail_first: 1 };
    let server = FileServer::start(&archives, faults);
    let root = work.path().join("pets");

    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert!(out.status.success());
    let seen = server.seen();
    let images: Vec<_> = seen.iter().filter(|r| r.path == "/images.tar.gz").collect();
    // 503, then a transfer cut at `cut` bytes, then a Range request from exactly there.
    assert_eq!(images.len(), 3, "{seen:?}");
    assert_eq!(images[0].range, None);
    assert_eq!(images[2].range.as_deref(), Some(format!("bytes={cut}-").as_str()));
    let report = json(&out);
    let img = &report["archives"][0];
    assert_eq!(img["name"], "images.tar.gz");
    assert_eq!(img["bytes"].as_u64().unwrap() as usize, size);
    assert_eq!(img["attempts"], 3);
    assert_eq!(std::fs::read_dir(root.join("images")).unwrap().count(), 12);
}

#[test]
fn resumes_a_partial_file_left_by_an_earlier_run() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 8);
    let server = FileServer::start(&archives, Faults::default());
    let root = work.path().join("pets");
    let full = std::fs::read(archives.join("annotations.tar.gz")).unwrap();
    std::fs::create_dir_all(root.join("downloads")).unwrap();
    std::fs::write(root.join("downloads/annotations.tar.gz.part"), &full[..full.len() / 2]).unwrap();

    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert!(out.status.success());
    let seen = server.seen();
    let ann = seen.iter().find(|r| r.path == "/annotations.tar.gz").unwrap();
    assert_eq!(ann.range.as_deref(), Some(format!("bytes={}-", full.len() / 2).as_str()));
    assert_eq!(json(&out)["archives"][1]["resumed_from"].as_u64(), Some(full.len() as u64 / 2));
}

#[test]
fn checksum_mismatch_deletes_the_file_and_fails() {
    let work = tempfile::tempdir().unwrap();
    let (archives, _) = synthetic_archives(work.path(), 6);
    let bad_sums = work.path().join("bad.txt");
    let real = md5_hex(&archives.join("images.tar.gz"));
    std::fs::write(&bad_sums, format!("{real}  images.tar.gz\n00000000000000000000000000000000  annotations.tar.gz\n")).unwrap();
    let server = FileServer::start(&archives, Faults::default());
    let root = work.path().join("pets");

    let out = run(&mut fetch_cmd(&root, &server.url(), &bad_sums));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("00000000000000000000000000000000"), "expected sum named: {err}");
    assert!(err.contains(&md5_hex(&archives.join("annotations.tar.gz"))), "actual sum named: {err}");
    assert!(!root.join("downloads/annotations.tar.gz.part").exists());
    assert!(!root.join("downloads/annotations.tar.gz").exists());
    assert!(!root.join("images").exists(), "nothing is extracted");
}

fn hostile_case(members: &[RawMember], expect: &str) {
    let work = tempfile::tempdir().unwrap();
    let (archives, _) = synthetic_archives(work.path(), 4);
    hostile_tar_gz(&archives.join("annotations.tar.gz"), members);
    let sums = work.path().join("sums.txt");
    std::fs::write(
        &sums,
        format!("{}  images.tar.gz\n{}  annotations.tar.gz\n", md5_hex(&archives.join("images.tar.gz")), md5_hex(&archives.join("annotations.tar.gz"))),
    )
    .unwrap();
    let root = work.path().join("pets");
    let out = run(segctl().args(["fetch-data", "--root"]).arg(&root).arg("--source").arg(&archives).arg("--checksums").arg(&sums));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(expect), "expected `{expect}` in: {}", stderr(&out));
    assert!(!work.path().join("evil.txt").exists() && !root.join("evil.txt").exists(), "nothing escaped");
    assert!(!root.join("annotations").exists() && !root.join("images").exists(), "nothing moved into place");
}

#[test]
fn hostile_archives_are_refused() {
    hostile_case(&[RawMember::File("annotations/ok.txt", b"x"), RawMember::File("../evil.txt", b"pwned")], "contains `..`");
    hostile_case(&[RawMember::File("/tmp/evil.txt", b"pwned")], "absolute path");
    hostile_case(&[RawMember::Symlink("annotations/link", "../../evil.txt")], "points outside");
    hostile_case(&[RawMember::Symlink("annotations/link", "/etc/passwd")], "points outside");
    hostile_case(&[RawMember::CharDevice("annotations/null")], "not allowed");
}

#[test]
fn extraction_size_cap_is_enforced() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 6);
    let root = work.path().join("pets");
    let out = run(segctl()
        .args(["fetch-data", "--set", "data.fetch.max_extract_bytes=10000", "--root"])
        .arg(&root)
        .arg("--source")
        .arg(&archives)
        .arg("--checksums")
        .arg(&sums));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("max_extract_bytes"), "{}", stderr(&out));
}

#[test]
fn a_missing_file_on_the_server_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let server = FileServer::start(&empty, Faults::default());
    let root = work.path().join("pets");
    let out = run(segctl().args(["fetch-data", "--root"]).arg(&root).args(["--source", &server.url()]));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("404") && err.contains("images.tar.gz"), "{err}");
    assert_eq!(err.trim().lines().filter(|l| l.starts_with("error")).count(), 1, "one error line: {err}");
}
