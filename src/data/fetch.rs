//! `fetch-data`: downloads the two Oxford-IIIT Pet archives (or takes them from a mirror or a
//! local folder), resumes partial downloads with HTTP Range, retries transient failures with
//! backoff, verifies MD5 sums, and extracts into a staging folder that is renamed into place,
//! refusing hostile archive members. A second run over a complete dataset does nothing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::DatasetLayout;
use crate::progress::{ProgressMode, Unit};

/// One of the published archives.
#[derive(Debug, Clone, Copy)]
pub struct Archive {
    pub name: &'static str,
    pub size: u64,
    pub md5: &'static str,
    /// The folder the archive extracts to.
    pub top_dir: &'static str,
}

/// The official archives (SPEC §2).
pub const ARCHIVES: [Archive; 2] = [
    Archive { name: "images.tar.gz", size: 791_918_971, md5: "5c4f3ee8e5d25df40f4fd59a7f44e54c", top_dir: "images" },
    Archive {
        name: "annotations.tar.gz",
        size: 19_173_078,
        md5: "95a8c909bbe2e81eed6a22bccdf3f68f",
        top_dir: "annotations",
    },
];

/// Official locations, tried in order.
pub const OFFICIAL_URL_PREFIXES: [&str; 2] =
    ["https://www.robots.ox.ac.uk/~vgg/data/pets/data/", "https://thor.robots.ox.ac.uk/datasets/pets/"];

/// Written into the root once a fetch completed and verified.
const STATE_FILE: &str = ".segctl-fetch.json";
/// Where downloaded archives are kept (so a re-extraction needs no network).
const DOWNLOAD_DIR: &str = "downloads";
/// Longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the archives come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// URL prefixes tried in order.
    Urls(Vec<String>),
    /// A local folder already holding both archives.
    Dir(PathBuf),
}

impl Source {
    /// `None` = official URLs; an `http(s)://` prefix; otherwise a local folder.
    pub fn parse(text: Option<&str>) -> Source {
        match text {
            None => Source::Urls(OFFICIAL_URL_PREFIXES.iter().map(|s| s.to_string()).collect()),
            Some(t) if t.starts_with("http://") || t.starts_with("https://") => {
                let prefix = if t.ends_with('/') { t.to_string() } else { format!("{t}/") };
                Source::Urls(vec![prefix])
            }
            Some(t) => Source::Dir(PathBuf::from(t)),
        }
    }
}

/// What `fetch-data` does.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub root: PathBuf,
    pub source: Source,
    /// md5sum-format file replacing the official sums.
    pub checksums: Option<PathBuf>,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub timeout: Duration,
    pub max_extract_bytes: u64,
    pub progress: ProgressMode,
}

/// What happened to one archive.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveReport {
    pub name: String,
    /// URL or path it came from.
    pub source: String,
    pub bytes: u64,
    pub md5: String,
    /// Bytes transferred in this run (0 when the archive was already there).
    pub downloaded_bytes: u64,
    /// A partial download was continued from this offset.
    pub resumed_from: Option<u64>,
    /// HTTP attempts made.
    pub attempts: u32,
}

/// What `fetch-data` did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub root: PathBuf,
    /// The dataset was already complete and verified: nothing was downloaded or extracted.
    pub already_complete: bool,
    pub archives: Vec<ArchiveReport>,
    pub extracted_files: u64,
    pub extracted_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FetchState {
    archives: BTreeMap<String, String>,
}

/// Reads md5sum-format lines (`<hex>  <name>` or `<hex> *<name>`) for the two archives.
pub fn read_checksums(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = crate::util::fs::read_to_string(path)?;
    let mut sums = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hash, name) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| anyhow!("`{}` line {}: expected `<md5>  <file name>`", path.display(), i + 1))?;
        let name = name.trim().trim_start_matches('*');
        let hash = hash.to_ascii_lowercase();
        if hash.len() != 32 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("`{}` line {}: `{hash}` is not an MD5 sum", path.display(), i + 1);
        }
        let base = Path::new(name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        sums.insert(base, hash);
    }
    for archive in ARCHIVES {
        if !sums.contains_key(archive.name) {
            bail!("`{}` has no checksum for `{}`", path.display(), archive.name);
        }
    }
    Ok(sums)
}

/// Executes `segctl fetch-data` (download mode).
pub fn fetch(options: &FetchOptions) -> Result<FetchReport> {
    let expected: BTreeMap<String, String> = match &options.checksums {
        Some(path) => read_checksums(path)?,
        None => ARCHIVES.iter().map(|a| (a.name.to_string(), a.md5.to_string())).collect(),
    };
    let layout = DatasetLayout::new(&options.root);
    let state_path = options.root.join(STATE_FILE);
    let wanted_state = FetchState { archives: expected.clone() };
    let current_state: Option<FetchState> =
        std::fs::read(&state_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if current_state.as_ref() == Some(&wanted_state) && layout.images_dir().is_dir() && layout.trimaps_dir().is_dir() {
        return Ok(FetchReport {
            root: options.root.clone(),
            already_complete: true,
            archives: Vec::new(),
            extracted_files: 0,
            extracted_bytes: 0,
        });
    }
    if layout.images_dir().exists() || layout.annotations_dir().exists() {
        if options.root.join(super::synthetic::MARKER_FILE).exists() {
            bail!("`{}` holds a synthetic dataset; choose another --root", options.root.display());
        }
        log::info!("{}: an incomplete or unverified dataset is present; it will be replaced", options.root.display());
    }
    crate::util::fs::create_dir_all(&options.root)?;

    let mut reports = Vec::new();
    let mut local_paths = Vec::new();
    for archive in ARCHIVES {
        let md5 = &expected[archive.name];
        let (path, report) = match &options.source {
            Source::Dir(dir) => {
                let path = dir.join(archive.name);
                if !path.is_file() {
                    bail!("`{}` is missing: --source {} must hold images.tar.gz and annotations.tar.gz", path.display(), dir.display());
                }
                let actual = crate::util::md5_file(&path)?;
                if &actual != md5 {
                    // The user's own file: reported, never deleted.
                    bail!("checksum mismatch for `{}`: expected MD5 {md5}, got {actual}", path.display());
                }
                let bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
                let report = ArchiveReport {
                    name: archive.name.into(),
                    source: path.display().to_string(),
                    bytes,
                    md5: actual,
                    downloaded_bytes: 0,
                    resumed_from: None,
                    attempts: 0,
                };
                (path, report)
            }
            Source::Urls(prefixes) => download_verified(options, &archive, md5, prefixes)?,
        };
        reports.push(report);
        local_paths.push(path);
    }

    let staging = tempfile::Builder::new()
        .prefix(".segctl-extract-")
        .tempdir_in(&options.root)
        .with_context(|| format!("failed to create a staging folder in `{}`", options.root.display()))?;
    let mut budget = ExtractBudget { remaining: options.max_extract_bytes, files: 0, bytes: 0 };
    for (archive, path) in ARCHIVES.iter().zip(&local_paths) {
        log::info!("extracting {}", archive.name);
        extract_tar_gz(path, staging.path(), &mut budget)
            .with_context(|| format!("failed to extract `{}`", path.display()))?;
        if !staging.path().join(archive.top_dir).is_dir() {
            bail!("`{}` does not contain the `{}/` folder", path.display(), archive.top_dir);
        }
    }
    for archive in ARCHIVES {
        let target = options.root.join(archive.top_dir);
        crate::util::fs::remove_dir_all_if_exists(&target)?;
        std::fs::rename(staging.path().join(archive.top_dir), &target)
            .with_context(|| format!("failed to move `{}` into place", target.display()))?;
    }
    crate::util::fs::write_atomic(&state_path, &serde_json::to_vec_pretty(&wanted_state)?)?;
    Ok(FetchReport {
        root: options.root.clone(),
        already_complete: false,
        archives: reports,
        extracted_files: budget.files,
        extracted_bytes: budget.bytes,
    })
}

/// Downloads one archive into `<root>/downloads/`, trying each prefix in turn, and checks its
/// MD5. A verified archive already there is reused.
fn download_verified(
    options: &FetchOptions,
    archive: &Archive,
    md5: &str,
    prefixes: &[String],
) -> Result<(PathBuf, ArchiveReport)> {
    let dir = options.root.join(DOWNLOAD_DIR);
    crate::util::fs::create_dir_all(&dir)?;
    let path = dir.join(archive.name);
    let part = dir.join(format!("{}.part", archive.name));
    if path.is_file() {
        let actual = crate::util::md5_file(&path)?;
        if actual == md5 {
            log::info!("{}: already downloaded and verified", archive.name);
            let bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
            let report = ArchiveReport {
                name: archive.name.into(),
                source: path.display().to_string(),
                bytes,
                md5: actual,
                downloaded_bytes: 0,
                resumed_from: None,
                attempts: 0,
            };
            return Ok((path, report));
        }
        log::warn!("{}: cached archive fails its checksum; downloading again", archive.name);
        crate::util::fs::remove_file_if_exists(&path)?;
    }
    let mut last_error = None;
    for prefix in prefixes {
        let url = format!("{prefix}{}", archive.name);
        match download_with_retries(options, &url, &part, archive) {
            Ok(mut report) => {
                let actual = crate::util::md5_file(&part)?;
                if actual != md5 {
                    crate::util::fs::remove_file_if_exists(&part)?;
                    bail!(
                        "checksum mismatch for {} from {url}: expected MD5 {md5}, got {actual}; the file was deleted",
                        archive.name
                    );
                }
                std::fs::rename(&part, &path)
                    .with_context(|| format!("failed to move `{}` into place", path.display()))?;
                report.md5 = actual;
                return Ok((path, report));
            }
            Err(e) => {
                if prefixes.len() > 1 {
                    log::warn!("{e:#}; trying the next source");
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no source URL"))).with_context(|| format!("failed to download {}", archive.name))
}

enum AttemptError {
    /// Worth retrying (connection problems, 5xx, 429, a body cut short).
    Transient(anyhow::Error),
    /// Retrying will not help (404, 403, a local write error).
    Permanent(anyhow::Error),
}

fn download_with_retries(options: &FetchOptions, url: &str, part: &Path, archive: &Archive) -> Result<ArchiveReport> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(options.timeout)
        .timeout_read(options.timeout)
        .user_agent(concat!("segctl/", env!("CARGO_PKG_VERSION")))
        .build();
    let initial = part.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = options.progress.bar(archive.name, None, Unit::Bytes);
    let mut report = ArchiveReport {
        name: archive.name.into(),
        source: url.into(),
        bytes: 0,
        md5: String::new(),
        downloaded_bytes: 0,
        resumed_from: (initial > 0).then_some(initial),
        attempts: 0,
    };
    let mut failures = 0u32;
    loop {
        report.attempts += 1;
        let before = part.metadata().map(|m| m.len()).unwrap_or(0);
        match download_attempt(&agent, url, part, &bar) {
            Ok(total) => {
                report.bytes = total;
                report.downloaded_bytes += total.saturating_sub(before);
                bar.finish();
                return Ok(report);
            }
            Err(AttemptError::Permanent(e)) => {
                bar.finish();
                return Err(e);
            }
            Err(AttemptError::Transient(e)) => {
                let after = part.metadata().map(|m| m.len()).unwrap_or(0);
                report.downloaded_bytes += after.saturating_sub(before);
                // Progress resets the count: a flaky link that keeps delivering is not failing.
                failures = if after > before { 1 } else { failures + 1 };
                if failures >= options.retries {
                    bar.finish();
                    return Err(e.context(format!("giving up after {} attempts", report.attempts)));
                }
                let delay = options.retry_backoff.saturating_mul(1 << (failures - 1).min(16)).min(MAX_BACKOFF);
                bar.println(&format!("{e:#}; retrying in {:.1}s (resuming at {after} bytes)", delay.as_secs_f64()));
                std::thread::sleep(delay);
            }
        }
    }
}

/// One HTTP request, appending to `part` from its current length. Returns the total size.
fn download_attempt(agent: &ureq::Agent, url: &str, part: &Path, bar: &crate::progress::Bar) -> Result<u64, AttemptError> {
    let offset = part.metadata().map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if offset > 0 {
        request = request.set("Range", &format!("bytes={offset}-"));
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if offset > 0 => {
            // The partial file already holds everything the server has.
            return Ok(offset);
        }
        Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 || code == 408 => {
            return Err(AttemptError::Transient(anyhow!("HTTP {code} from {url}")));
        }
        Err(ureq::Error::Status(code, r)) => {
            return Err(AttemptError::Permanent(anyhow!("HTTP {code} {} from {url}", r.status_text())));
        }
        Err(ureq::Error::Transport(t)) => return Err(AttemptError::Transient(anyhow!("{t}"))),
    };
    let (start, total) = match response.status() {
        206 => {
            let range = response.header("Content-Range").unwrap_or("");
            let parsed = parse_content_range(range);
            match parsed {
                Some((start, total)) if start == offset => (start, total),
                _ => return Err(AttemptError::Transient(anyhow!("unexpected Content-Range `{range}` for offset {offset}"))),
            }
        }
        _ => {
            let length = response.header("Content-Length").and_then(|v| v.parse::<u64>().ok());
            (0, length)
        }
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(start == 0)
        .append(start > 0)
        .open(part)
        .map_err(|e| AttemptError::Permanent(anyhow!("failed to open `{}`: {e}", part.display())))?;
    if let Some(total) = total {
        bar.set_total(total);
    }
    bar.set_position(start);
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = file.flush();
                return Err(AttemptError::Transient(anyhow!("connection broke after {written} bytes: {e}")));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| AttemptError::Permanent(anyhow!("failed to write `{}`: {e}", part.display())))?;
        written += n as u64;
        bar.inc(n as u64);
    }
    file.flush().map_err(|e| AttemptError::Permanent(anyhow!("failed to write `{}`: {e}", part.display())))?;
    match total {
        Some(total) if written < total => {
            Err(AttemptError::Transient(anyhow!("connection closed after {written} of {total} bytes")))
        }
        _ => Ok(written),
    }
}

/// Parses `bytes START-END/TOTAL` into (START, TOTAL if known).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Running totals of an extraction, with the size cap.
pub struct ExtractBudget {
    pub remaining: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Extracts a `.tar.gz` into `dest`, refusing members that would land outside it (absolute
/// paths, `..`, links pointing out), device files and FIFOs, and stopping at the size cap.
pub fn extract_tar_gz(archive: &Path, dest: &Path, budget: &mut ExtractBudget) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("failed to open `{}`", archive.display()))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    tar.set_preserve_mtime(false);
    for entry in tar.entries().context("not a tar archive")? {
        let mut entry = entry.context("corrupt tar archive")?;
        let path = entry.path().context("member with an unreadable name")?.into_owned();
        check_member_path(&path)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if size > budget.remaining {
                    bail!("archive expands past the cap on extracted size (data.fetch.max_extract_bytes); refusing");
                }
                budget.remaining -= size;
                budget.bytes += size;
                budget.files += 1;
            }
            tar::EntryType::Directory => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .context("link without a target")?
                    .ok_or_else(|| anyhow!("link `{}` has no target", path.display()))?
                    .into_owned();
                let resolved = if kind == tar::EntryType::Symlink {
                    path.parent().unwrap_or(Path::new("")).join(&target)
                } else {
                    target.clone()
                };
                if target.is_absolute() || !stays_inside(&resolved) {
                    bail!("refusing archive member `{}`: link to `{}` points outside the destination", path.display(), target.display());
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => bail!("refusing archive member `{}`: {other:?} entries (devices, FIFOs) are not allowed", path.display()),
        }
        let unpacked = entry.unpack_in(dest).with_context(|| format!("failed to extract `{}`", path.display()))?;
        if !unpacked {
            bail!("refusing archive member `{}`: it would land outside the destination", path.display());
        }
    }
    Ok(())
}

fn check_member_path(path: &Path) -> Result<()> {
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => bail!("refusing archive member `{}`: it contains `..`", path.display()),
            Component::RootDir | Component::Prefix(_) => {
                bail!("refusing archive member `{}`: absolute path", path.display())
            }
        }
    }
    Ok(())
}

/// Whether a relative path, with `..` resolved lexically, stays inside its root.
fn stays_inside(path: &Path) -> bool {
    let mut depth: i64 = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("nonsense"), None);
    }

    #[test]
    fn member_paths_and_links() {
        assert!(check_member_path(Path::new("images/a.jpg")).is_ok());
        assert!(check_member_path(Path::new("../a")).is_err());
        assert!(check_member_path(Path::new("/etc/passwd")).is_err());
        assert!(stays_inside(Path::new("images/../annotations/x")));
        assert!(!stays_inside(Path::new("images/../../x")));
    }

    #[test]
    fn source_parsing() {
        assert_eq!(Source::parse(Some("http://127.0.0.1:9/d")), Source::Urls(vec!["http://127.0.0.1:9/d/".into()]));
        assert_eq!(Source::parse(Some("/tmp/x")), Source::Dir("/tmp/x".into()));
        assert!(matches!(Source::parse(None), Source::Urls(v) if v.len() == 2));
    }

    #[test]
    fn checksum_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sums");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef  images.tar.gz\n0123456789ABCDEF0123456789abcdef *dl/annotations.tar.gz\n").unwrap();
        let sums = read_checksums(&p).unwrap();
        assert_eq!(sums["annotations.tar.gz"], "0123456789abcdef0123456789abcdef");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef  images.tar.gz\n").unwrap();
        assert!(format!("{:#}", read_checksums(&p).unwrap_err()).contains("annotations.tar.gz"));
    }
}
