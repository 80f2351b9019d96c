//! Test helpers: a `segctl` command runner, synthetic datasets, archives, and a small loopback
//! HTTP file server with Range support and fault injection.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// A `segctl` invocation with logs kept quiet unless asked.
pub fn segctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segctl"));
    cmd.env("RUST_LOG", "segctl=warn");
    cmd.env_remove("HF_HOME");
    cmd
}

/// Runs and returns the output, with stdout/stderr shown on failure of later asserts.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("segctl runs");
    eprintln!("$ {cmd:?}\n--- status {:?}\n--- stdout\n{}\n--- stderr\n{}", out.status.code(), stdout(&out), stderr(&out));
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a synthetic dataset of `n` samples into `root`.
pub fn synthetic_dataset(root: &Path, n: usize, seed: u64) {
    let out = run(segctl().args(["fetch-data", "--synthetic", &n.to_string(), "--seed", &seed.to_string(), "--root"]).arg(root));
    assert!(out.status.success(), "synthetic dataset generation failed");
}

/// Packs `root/<top>` into a `.tar.gz` at `dest`, like the published archives.
pub fn tar_gz_dir(root: &Path, top: &str, dest: &Path) {
    let file = std::fs::File::create(dest).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    builder.append_dir_all(top, root.join(top)).unwrap();
    builder.into_inner().unwrap().finish().unwrap();
}

/// A `.tar.gz` with raw members, bypassing the tar crate's path checks (hostile archives).
pub enum RawMember<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    CharDevice(&'a str),
    /// A regular file whose header declares this size, with no data after it.
    Declared(&'a str, u64),
}

pub fn hostile_tar_gz(dest: &Path, members: &[RawMember]) {
    let file = std::fs::File::create(dest).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for member in members {
        let mut header = tar::Header::new_old();
        let mut size = None;
        let (name, data, kind): (&str, &[u8], tar::EntryType) = match member {
            RawMember::File(name, data) => (name, data, tar::EntryType::Regular),
            RawMember::Declared(name, declared) => {
                size = Some(*declared);
                (name, &[], tar::EntryType::Regular)
            }
            RawMember::Symlink(name, target) => {
                let raw = header.as_old_mut();
                raw.linkname[..target.len()].copy_from_slice(target.as_bytes());
                (name, &[], tar::EntryType::Symlink)
            }
            RawMember::CharDevice(name) => (name, &[], tar::EntryType::Char),
        };
        let raw = header.as_old_mut();
        raw.name = [0; 100];
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(size.unwrap_or(data.len() as u64));
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap();
}

/// A `.tar.gz` of `count` empty files `<top>/m/<i>` (a member-count bomb), written fast.
pub fn many_members_tar_gz(dest: &Path, top: &str, count: usize) {
    let file = std::fs::File::create(dest).unwrap();
    let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    for i in 0..count {
        let mut header = tar::Header::new_old();
        let name = format!("{top}/m/{i}");
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(0);
        header.set_mode(0o644);
        header.set_cksum();
        gz.write_all(header.as_bytes()).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap().flush().unwrap();
}

/// Rewrites the md5sum file of `archives` (after an archive was replaced).
pub fn write_sums(archives: &Path, sums: &Path) {
    let text = format!(
        "{}  images.tar.gz\n{}  annotations.tar.gz\n",
        md5_hex(&archives.join("images.tar.gz")),
        md5_hex(&archives.join("annotations.tar.gz"))
    );
    std::fs::write(sums, text).unwrap();
}

/// Hex MD5 of a file.
pub fn md5_hex(path: &Path) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(std::fs::read(path).unwrap()))
}

/// Builds `images.tar.gz` + `annotations.tar.gz` from a synthetic dataset of `n` samples, and
/// an md5sum file for them. Returns (archive folder, checksum file).
pub fn synthetic_archives(work: &Path, n: usize) -> (PathBuf, PathBuf) {
    let src = work.join("src-dataset");
    synthetic_dataset(&src, n, 3);
    let archives = work.join("archives");
    std::fs::create_dir_all(&archives).unwrap();
    tar_gz_dir(&src, "images", &archives.join("images.tar.gz"));
    tar_gz_dir(&src, "annotations", &archives.join("annotations.tar.gz"));
    let sums = work.join("md5sums.txt");
    let text = format!(
        "{}  images.tar.gz\n{}  annotations.tar.gz\n",
        md5_hex(&archives.join("images.tar.gz")),
        md5_hex(&archives.join("annotations.tar.gz"))
    );
    std::fs::write(&sums, text).unwrap();
    (archives, sums)
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    pub range: Option<String>,
}

/// A loopback HTTP/1.1 file server: serves a folder, honours `Range: bytes=N-`, and can cut the
/// connection after some bytes of a file (once) to simulate a dropped download.
pub struct FileServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
}

#[derive(Clone, Default)]
pub struct Faults {
    /// file name → bytes to send before dropping the connection, on the first request only.
    pub cut_after: HashMap<String, usize>,
    /// Answer this many requests with 503 first.
    pub fail_first: usize,
    /// file name → bytes to send before stalling (until the client goes away), first request only.
    pub stall_after: HashMap<String, usize>,
}

impl FileServer {
    pub fn start(dir: &Path, faults: Faults) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let dir = dir.to_path_buf();
        let faults = Arc::new(Mutex::new(faults));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (dir, seen, faults) = (dir.clone(), seen.clone(), faults.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &dir, &seen, &faults);
                });
            }
        });
        FileServer { port, requests }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(mut stream: TcpStream, dir: &Path, seen: &Mutex<Vec<SeenRequest>>, faults: &Mutex<Faults>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    seen.lock().unwrap().push(SeenRequest { path: path.clone(), range: range.clone() });
    {
        let mut f = faults.lock().unwrap();
        if f.fail_first > 0 {
            f.fail_first -= 1;
            stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
    }
    let name = path.trim_start_matches('/');
    let Ok(mut body) = std::fs::read(dir.join(name)) else {
        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    };
    let total = body.len();
    // `bytes=N-` or `bytes=N-M` (hf-hub asks `bytes=0-0` for metadata).
    let span = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        let start = a.parse::<usize>().ok()?;
        let end = if b.is_empty() { total.saturating_sub(1) } else { b.parse::<usize>().ok()?.min(total.saturating_sub(1)) };
        Some((start, end))
    });
    // Hugging Face Hub headers, so hf-hub can use this server as HF_ENDPOINT.
    let hub = "ETag: \"test-etag\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\n";
    let header = match span {
        Some((s, e)) if s < total && s <= e => {
            body = body[s..=e].to_vec();
            format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{e}/{total}\r\n{hub}Connection: close\r\n\r\n", body.len())
        }
        Some(_) => format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n{hub}Connection: close\r\n\r\n"),
    };
    stream.write_all(header.as_bytes())?;
    if header.contains(" 416 ") {
        return Ok(());
    }
    let cut = faults.lock().unwrap().cut_after.remove(name);
    let stall = faults.lock().unwrap().stall_after.remove(name);
    if let Some(n) = stall {
        stream.write_all(&body[..n.min(body.len())])?;
        stream.flush()?;
        // Hold the connection open, sending nothing, until the client closes it (or dies).
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
        return Ok(());
    }
    match cut {
        Some(n) => {
            stream.write_all(&body[..n.min(body.len())])?;
            stream.flush()?;
            stream.shutdown(std::net::Shutdown::Both)?;
        }
        None => stream.write_all(&body)?,
    }
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
    Ok(())
}

/// Parses stdout as JSON.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(out)))
}

/// A tiny, fast configuration (32×32 input, 2-level UNet 4 channels wide) over `root`,
/// writing runs to `runs`.
pub fn tiny_config(dir: &Path, root: &Path, epochs: usize) -> PathBuf {
    let path = dir.join("tiny.yaml");
    let yaml = format!(
        "data:\n  root: {}\n  image_size: 32\n  val_fraction: 0.25\n  seed: 1\n  prefetch_batches: 2\n\
         model:\n  arch: unet\n  unet:\n    depth: 2\n    base_width: 4\n\
         train:\n  epochs: {epochs}\n  batch_size: 4\n  device: cpu\n  output_dir: {}\n  run_name: tiny\n  seed: 3\n  optimizer:\n    lr: 0.01\n  schedule:\n    kind: cosine\n    warmup_epochs: 0\n  loss:\n    kind: ce_dice\n\
         evaluate:\n  batch_size: 8\n\
         serve:\n  device: cpu\n",
        root.display(),
        dir.join("runs").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A synthetic dataset, a tiny trained run and its export as `pets` version 1. Returns
/// (config, run folder, repository).
pub fn trained_model(dir: &Path, samples: usize) -> (PathBuf, PathBuf, PathBuf) {
    let root = dir.join("pets");
    synthetic_dataset(&root, samples, 5);
    let config = tiny_config(dir, &root, 2);
    let out = run(segctl().args(["train", "--config"]).arg(&config));
    assert!(out.status.success(), "training failed");
    let run_dir = dir.join("runs/tiny");
    let repo = dir.join("models");
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success(), "export failed");
    (config, run_dir, repo)
}

/// Sends a signal to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

/// `segctl serve --json --port 0` over `repo`: the child (killed on drop) and its start-up line.
pub struct JsonServer {
    pub child: std::process::Child,
    /// The start-up JSON line (`address`, `url`, `port`, `repository`, `models`).
    pub started: serde_json::Value,
    pub url: String,
}

impl JsonServer {
    pub fn start(config: &Path, repo: &Path) -> JsonServer {
        let mut child = segctl()
            .args(["serve", "--json", "--port", "0", "--config"])
            .arg(config)
            .arg("--repository")
            .arg(repo)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line}"));
        let url = started["url"].as_str().unwrap().to_string();
        JsonServer { child, started, url }
    }

    /// Waits (at most 10 s) until `path` answers 200.
    pub fn wait_for(&self, path: &str) -> bool {
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(10)).build();
        for _ in 0..200 {
            if agent.get(&format!("{}{path}", self.url)).call().is_ok() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that runs the ecosystem's checkers (`SEGCTL_TEST_PYTHON`, set by .ci/run; else
/// `python3`) when it can `import` what `imports` names, or none: then the check is skipped
/// with a notice naming `pip`, unless REQUIRE_ALL=1 (as in CI) makes that a failure.
pub fn checker_python(imports: &str, pip: &str) -> Option<String> {
    let python = std::env::var("SEGCTL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).args(["-c", &format!("import {imports}")]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(std::env::var("REQUIRE_ALL").as_deref() != Ok("1"), "{python} cannot import {imports} and REQUIRE_ALL=1");
    eprintln!("SKIPPED: {python} cannot import {imports} ({pip})");
    None
}
