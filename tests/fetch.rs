use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

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
    let faults = Faults { cut_after: HashMap::from([("images.tar.gz".to_string(), cut)]), fail_first: 1, ..Default::default() };
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

fn local_fetch(root: &Path, archives: &Path, sums: &Path) -> std::process::Command {
    let mut cmd = segctl();
    cmd.args(["fetch-data", "--json", "--root"]).arg(root).arg("--source").arg(archives).arg("--checksums").arg(sums);
    cmd
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn the_users_own_folders_are_refused_then_kept_in_the_trash_with_force() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 8);
    let root = work.path().join("pets");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    std::fs::write(root.join("images/vacation.jpg"), b"my own photo").unwrap();
    std::fs::write(root.join("annotations/mine.txt"), b"my own notes").unwrap();

    // Without --force: refused with exit 2, naming both folders; nothing of the user's moves.
    let out = run(&mut local_fetch(&root, &archives, &sums));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for what in [root.join("images").display().to_string(), root.join("annotations").display().to_string(), "--force".into()] {
        assert!(err.contains(&what), "`{what}` not named: {err}");
    }
    assert!(err.contains("images/vacation.jpg") || err.contains("annotations/mine.txt"), "{err}");
    assert_eq!(std::fs::read(root.join("images/vacation.jpg")).unwrap(), b"my own photo");
    assert_eq!(std::fs::read(root.join("annotations/mine.txt")).unwrap(), b"my own notes");
    assert_eq!(names(&root.join("images")), vec!["vacation.jpg"]);
    assert!(!root.join(".segctl-fetch.json").exists());
    assert!(names(&root).iter().all(|n| !n.starts_with(".segctl-extract-")), "staging removed: {:?}", names(&root));

    // With --force: the old folders go to the trash, whole, and the dataset is extracted.
    let out = run(local_fetch(&root, &archives, &sums).arg("--force"));
    assert!(out.status.success());
    let report = json(&out);
    let trash = std::path::PathBuf::from(report["trash"].as_str().expect("a trash folder"));
    assert_eq!(trash.parent().unwrap(), root);
    assert!(trash.file_name().unwrap().to_string_lossy().starts_with(".segctl-trash-"), "{}", trash.display());
    assert_eq!(report["moved_to_trash"], serde_json::json!(["images", "annotations"]));
    assert_eq!(std::fs::read(trash.join("images/vacation.jpg")).unwrap(), b"my own photo");
    assert_eq!(std::fs::read(trash.join("annotations/mine.txt")).unwrap(), b"my own notes");
    assert_eq!(names(&root.join("images")).len(), 8);
    assert!(!root.join("images/vacation.jpg").exists());
    assert!(run(segctl().args(["validate", "--root"]).arg(&root)).status.success());

    // A file the user adds inside the fetched dataset: the next run is a no-op and keeps it.
    std::fs::write(root.join("annotations/notes.txt"), b"added later").unwrap();
    let out = run(&mut local_fetch(&root, &archives, &sums));
    assert!(out.status.success());
    assert_eq!(json(&out)["already_complete"], true);
    assert_eq!(std::fs::read(root.join("annotations/notes.txt")).unwrap(), b"added later");

    // Other archives (a different dataset): the folders are segctl's except that one file,
    // which is known without downloading or extracting anything.
    let other = work.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (archives2, sums2) = synthetic_archives(&other, 6);
    let out = run(&mut local_fetch(&root, &archives2, &sums2));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("annotations/notes.txt"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&root.join("images").display().to_string()), "images/ is segctl's: {}", stderr(&out));
    // Without it, segctl's own folders are replaced without --force and without a trash.
    std::fs::remove_file(root.join("annotations/notes.txt")).unwrap();
    let out = run(&mut local_fetch(&root, &archives2, &sums2));
    assert!(out.status.success());
    assert_eq!(json(&out)["trash"], serde_json::Value::Null);
    assert_eq!(names(&root.join("images")).len(), 6);
    assert_eq!(names(&root).iter().filter(|n| n.starts_with(".segctl-trash-")).count(), 1, "only the first trash: {:?}", names(&root));
}

#[test]
fn a_synthetic_root_is_refused_and_trashed_with_force() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 6);
    let root = work.path().join("pets");
    synthetic_dataset(&root, 5, 9);
    let out = run(&mut local_fetch(&root, &archives, &sums));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("synthetic") && stderr(&out).contains("--force"), "{}", stderr(&out));
    let out = run(local_fetch(&root, &archives, &sums).arg("--force"));
    assert!(out.status.success());
    let trash = std::path::PathBuf::from(json(&out)["trash"].as_str().unwrap());
    assert_eq!(names(&trash.join("images")).len(), 5);
    assert!(trash.join(".segctl-synthetic.json").is_file());
    assert_eq!(names(&root.join("images")).len(), 6);
}

#[test]
fn chained_links_and_member_bombs_are_refused() {
    // `x` is `.`, so `x/x/x/../../../..` climbs out of the root although it looks inside.
    hostile_case(
        &[RawMember::Symlink("annotations/x", "."), RawMember::Symlink("annotations/a.png", "x/x/x/../../../../dev/zero")],
        "points outside",
    );
    // A single member declaring 1 GiB (inside the 4 GiB total) is refused from its header.
    hostile_case(&[RawMember::Declared("annotations/huge.png", 1 << 30)], "data.fetch.max_member_bytes");

    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 4);
    many_members_tar_gz(&archives.join("annotations.tar.gz"), "annotations", 500_000);
    write_sums(&archives, &sums);
    let root = work.path().join("pets");
    let start = Instant::now();
    let out = run(&mut local_fetch(&root, &archives, &sums));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("data.fetch.max_members"), "{}", stderr(&out));
    assert!(!root.join("images").exists() && !root.join("annotations").exists(), "nothing moved into place");
    assert!(names(&root).iter().all(|n| !n.starts_with(".segctl-extract-")), "{:?}", names(&root));
    eprintln!("refused in {:?}", start.elapsed());
}

#[test]
fn a_killed_fetch_leaves_nothing_half_done_and_the_next_run_completes() {
    let work = tempfile::tempdir().unwrap();
    let (archives, sums) = synthetic_archives(work.path(), 8);
    let size = std::fs::metadata(archives.join("images.tar.gz")).unwrap().len() as usize;
    let stall = size / 2;
    let server = FileServer::start(&archives, Faults { stall_after: HashMap::from([("images.tar.gz".to_string(), stall)]), ..Default::default() });
    let root = work.path().join("pets");

    let mut child = fetch_cmd(&root, &server.url(), &sums).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let part = root.join("downloads/images.tar.gz.part");
    let start = Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len() as usize) < stall {
        assert!(start.elapsed() < Duration::from_secs(60), "the download did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // While it runs, a second fetch-data on the same root is turned away.
    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("another `segctl fetch-data`") && stderr(&out).contains(".segctl-fetch.lock"), "{}", stderr(&out));

    signal(child.id(), "KILL");
    child.wait().unwrap();
    assert!(!root.join("images").exists() && !root.join("annotations").exists() && !root.join(".segctl-fetch.json").exists());
    // What a run killed later (while extracting, while writing the state file) leaves.
    std::fs::create_dir_all(root.join(".segctl-extract-Ab12Cd/images")).unwrap();
    std::fs::write(root.join(".segctl-extract-Ab12Cd/images/half.jpg"), b"half").unwrap();
    std::fs::write(root.join(".tmp-Zy98Xw"), b"{").unwrap();

    let out = run(&mut fetch_cmd(&root, &server.url(), &sums));
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["archives"][0]["resumed_from"].as_u64(), Some(stall as u64), "the partial download resumed");
    let ranges: Vec<_> = server.seen().into_iter().filter(|r| r.path == "/images.tar.gz").map(|r| r.range).collect();
    assert_eq!(ranges.last().unwrap().as_deref(), Some(format!("bytes={stall}-").as_str()));
    assert_eq!(names(&root.join("images")).len(), 8);
    assert_eq!(names(&root), vec![".segctl-fetch.json", ".segctl-fetch.lock", "annotations", "downloads", "images"]);
    assert_eq!(names(&root.join("downloads")), vec!["annotations.tar.gz", "images.tar.gz"]);
    assert!(run(segctl().args(["validate", "--root"]).arg(&root)).status.success());
}
