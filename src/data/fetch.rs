//! `fetch-data`: downloads the two Oxford-IIIT Pet archives (or takes them from a mirror or a
//! local folder), resumes partial downloads with HTTP Range, retries transient failures with
//! backoff, verifies MD5 sums, and extracts into a staging folder that is renamed into place,
//! refusing hostile archive members. A second run over a complete dataset does nothing.
//!
//! It touches only what it made: `images/` and `annotations/` are replaced only when everything
//! in them is something segctl extracted (recorded in the state file, or the very files the
//! archives hold); anything else is refused unless `--force`, which moves the old folders to
//! `<root>/.segctl-trash-<time>/`. A lock file keeps two runs on one root apart, and a run
//! cleans what a killed run left (staging folders, temporary files; partial downloads resume).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::progress::{ProgressMode, Unit};
use crate::util::fs::FileLock;

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

/// Written into the root: what segctl extracted there, from which archives.
pub const STATE_FILE: &str = ".segctl-fetch.json";
/// Held (locked) while a `fetch-data` works on the root.
pub const LOCK_FILE: &str = ".segctl-fetch.lock";
/// Name prefix of extraction staging folders in the root.
pub const STAGING_PREFIX: &str = ".segctl-extract-";
/// Name prefix of the folders `--force` moves replaced folders into.
pub const TRASH_PREFIX: &str = ".segctl-trash-";
/// Most links followed while resolving one archive link.
const MAX_LINK_HOPS: u32 = 40;
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
    pub limits: ExtractLimits,
    /// Replace `images/` and `annotations/` even when they hold files segctl did not extract,
    /// moving them to `<root>/.segctl-trash-<time>/` first.
    pub force: bool,
    pub progress: ProgressMode,
}

/// Caps on what the archives may hold (decompression bombs, inode exhaustion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Bytes of all members together (`data.fetch.max_extract_bytes`).
    pub max_bytes: u64,
    /// Members of both archives together (`data.fetch.max_members`).
    pub max_members: u64,
    /// Bytes of any single member (`data.fetch.max_member_bytes`).
    pub max_member_bytes: u64,
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
    /// Where `--force` moved folders that held files segctl did not extract.
    pub trash: Option<PathBuf>,
    /// What was moved there (`images`, `annotations`).
    pub moved_to_trash: Vec<String>,
}

/// The state file: what segctl put under `images/` and `annotations/`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FetchState {
    /// MD5 of each archive the files come from.
    archives: BTreeMap<String, String>,
    /// `false` while the folders are being replaced.
    #[serde(default = "complete_by_default")]
    complete: bool,
    /// Every entry extracted, by path relative to the root (`images/a.jpg`). Empty in state
    /// files of older versions.
    #[serde(default)]
    files: BTreeMap<String, TreeEntry>,
}

/// State files of older versions were written only once complete.
fn complete_by_default() -> bool {
    true
}

/// One entry of a folder tree, as compared to what segctl extracted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum TreeEntry {
    Dir,
    /// A regular file of this many bytes.
    File(u64),
    /// A symbolic link to this target.
    Link(String),
    /// A device, FIFO or socket.
    Other,
}

impl TreeEntry {
    fn of(path: &Path) -> std::io::Result<TreeEntry> {
        let meta = std::fs::symlink_metadata(path)?;
        let kind = meta.file_type();
        Ok(if kind.is_dir() {
            TreeEntry::Dir
        } else if kind.is_file() {
            TreeEntry::File(meta.len())
        } else if kind.is_symlink() {
            TreeEntry::Link(std::fs::read_link(path)?.to_string_lossy().into_owned())
        } else {
            TreeEntry::Other
        })
    }
}

/// Every entry under `base/top` (not following links), keyed `top/relative/path`.
fn list_tree(base: &Path, top: &str) -> Result<BTreeMap<String, TreeEntry>> {
    let mut out = BTreeMap::new();
    walk_tree(base, top, &mut |key, entry| {
        out.insert(key, entry);
        true
    })?;
    Ok(out)
}

/// Visits every entry under `base/top` (not following links) until `visit` returns false.
fn walk_tree(base: &Path, top: &str, visit: &mut dyn FnMut(String, TreeEntry) -> bool) -> Result<()> {
    let mut pending = vec![top.to_string()];
    while let Some(rel) = pending.pop() {
        let dir = base.join(&rel);
        let entries = std::fs::read_dir(&dir).with_context(|| format!("failed to list `{}`", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("failed to list `{}`", dir.display()))?;
            let key = format!("{rel}/{}", entry.file_name().to_string_lossy());
            let kind = TreeEntry::of(&entry.path()).with_context(|| format!("failed to read `{}`", entry.path().display()))?;
            if kind == TreeEntry::Dir {
                pending.push(key.clone());
            }
            if !visit(key, kind) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The first entry under `root/top` that is not in any of `known` exactly as listed there
/// (`top` itself when it is not a folder), or `None` when segctl made everything in it.
fn foreign_entry(root: &Path, top: &str, known: &[&BTreeMap<String, TreeEntry>]) -> Result<Option<String>> {
    if !std::fs::symlink_metadata(root.join(top)).is_ok_and(|m| m.is_dir()) {
        return Ok(Some(top.to_string()));
    }
    let mut foreign = None;
    walk_tree(root, top, &mut |key, entry| {
        if known.iter().any(|k| k.get(&key) == Some(&entry)) {
            return true;
        }
        foreign = Some(key);
        false
    })?;
    Ok(foreign)
}

/// Whether every recorded entry is present as recorded (files the user added are allowed).
fn is_complete(root: &Path, files: &BTreeMap<String, TreeEntry>) -> bool {
    files.iter().all(|(key, entry)| TreeEntry::of(&root.join(key)).is_ok_and(|e| e == *entry))
}

/// Whether the state records a complete extraction of `expected` whose files are all there.
fn is_done(root: &Path, state: &FetchState, expected: &BTreeMap<String, String>) -> bool {
    if !state.complete || state.archives != *expected {
        return false;
    }
    if state.files.is_empty() {
        // A state file of an older segctl, which recorded only the archives.
        let layout = super::DatasetLayout::new(root);
        return layout.images_dir().is_dir() && layout.trimaps_dir().is_dir();
    }
    is_complete(root, &state.files)
}

fn read_state(path: &Path) -> Option<FetchState> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(state) => Some(state),
        Err(e) => {
            log::warn!("ignoring unreadable `{}`: {e}", path.display());
            None
        }
    }
}

fn write_state(path: &Path, state: &FetchState) -> Result<()> {
    crate::util::fs::write_durable(path, &serde_json::to_vec(state)?)
}

/// The one-line refusal for folders holding files segctl did not extract.
fn refusal(root: &Path, foreign: &[(&str, String)]) -> anyhow::Error {
    let folders: Vec<String> = foreign.iter().map(|(top, _)| format!("`{}`", root.join(top).display())).collect();
    let examples: Vec<String> = foreign.iter().map(|(_, e)| format!("`{e}`")).collect();
    anyhow!(
        "{} already exist{} and hold{} files segctl did not extract (e.g. {}); nothing was changed. \
         Move {} away, or rerun with --force to move {} into `{}/` and fetch the dataset",
        folders.join(" and "),
        if foreign.len() == 1 { "s" } else { "" },
        if foreign.len() == 1 { "s" } else { "" },
        examples.join(", "),
        if foreign.len() == 1 { "it" } else { "them" },
        if foreign.len() == 1 { "it" } else { "them" },
        root.join(format!("{TRASH_PREFIX}<time>")).display()
    )
}

/// Creates `<root>/.segctl-trash-<UTC time>/` (with a suffix when that exists).
fn create_trash(root: &Path) -> Result<PathBuf> {
    let stamp = crate::util::utc_timestamp().replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string();
    for n in 0..1000 {
        let name = if n == 0 { format!("{TRASH_PREFIX}{stamp}") } else { format!("{TRASH_PREFIX}{stamp}-{n}") };
        let path = root.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to create `{}`", path.display())),
        }
    }
    bail!("failed to create a trash folder in `{}`", root.display())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_context(|| format!("failed to move `{}` to `{}`", from.display(), to.display()))
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
    // Into a bucket: fetched into the local mirror (resumable there), then uploaded, split
    // files last, so a reader that finds them finds every sample.
    if let Some(remote) = crate::storage::remote(&options.root)? {
        let local = remote.cache_dir();
        let mut report = fetch(&FetchOptions { root: local.clone(), ..options.clone() })?;
        crate::storage::upload_dir(&local, &remote, &super::SPLIT_FILES_LAST)?;
        report.root = options.root.clone();
        return Ok(report);
    }
    let expected: BTreeMap<String, String> = match &options.checksums {
        Some(path) => read_checksums(path)?,
        None => ARCHIVES.iter().map(|a| (a.name.to_string(), a.md5.to_string())).collect(),
    };
    let root = &options.root;
    let state_path = root.join(STATE_FILE);
    let done = FetchReport {
        root: root.clone(),
        already_complete: true,
        archives: Vec::new(),
        extracted_files: 0,
        extracted_bytes: 0,
        trash: None,
        moved_to_trash: Vec::new(),
    };
    // Checked before taking the lock (a complete dataset on a read-only root is fine; the
    // state says complete only once the folders are in place) and again once holding it.
    if read_state(&state_path).is_some_and(|s| is_done(root, &s, &expected)) {
        return Ok(done);
    }
    crate::util::fs::create_dir_all(root)?;
    let lock_path = root.join(LOCK_FILE);
    let _lock = FileLock::try_acquire(&lock_path)?.with_context(|| {
        format!("another `segctl fetch-data` is working on `{}` (it holds `{}`); wait for it to finish", root.display(), lock_path.display())
    })?;
    // What a killed run left: staging folders and temporary files (partial downloads resume).
    crate::util::fs::remove_leftovers(root, STAGING_PREFIX)?;
    crate::util::fs::remove_leftovers(root, crate::util::fs::TEMP_PREFIX)?;
    crate::util::fs::remove_leftovers(&root.join(DOWNLOAD_DIR), crate::util::fs::TEMP_PREFIX)?;

    let state = read_state(&state_path);
    if state.as_ref().is_some_and(|s| is_done(root, s, &expected)) {
        return Ok(done);
    }
    let tops: Vec<&str> = ARCHIVES.iter().map(|a| a.top_dir).collect();
    let present: Vec<&str> = tops.iter().copied().filter(|top| std::fs::symlink_metadata(root.join(top)).is_ok()).collect();
    let same_archives = state.as_ref().is_some_and(|s| s.archives == expected);
    let synthetic = root.join(super::synthetic::MARKER_FILE);
    let is_synthetic = synthetic.exists() && !present.is_empty();
    if synthetic.exists() && present.is_empty() {
        // segctl's marker of a synthetic dataset that is no longer there.
        crate::util::fs::remove_file_if_exists(&synthetic)?;
    }
    if is_synthetic && !options.force {
        bail!(
            "`{}` holds a synthetic dataset; choose another --root, or rerun with --force to move it into `{}/`",
            root.display(),
            root.join(format!("{TRASH_PREFIX}<time>")).display()
        );
    }
    // With the same archives as recorded, the recorded files are exactly what extraction would
    // give: anything else is the user's, known before any download.
    let recorded = state.as_ref().map(|s| &s.files);
    if same_archives
        && !options.force
        && !is_synthetic
        && let Some(files) = recorded.filter(|f| !f.is_empty())
    {
        let mut foreign = Vec::new();
        for top in &present {
            if let Some(example) = foreign_entry(root, top, &[files])? {
                foreign.push((*top, example));
            }
        }
        if !foreign.is_empty() {
            return Err(refusal(root, &foreign));
        }
    }

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
        .prefix(STAGING_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("failed to create a staging folder in `{}`", root.display()))?;
    let archives: Vec<(&Path, &str)> = local_paths.iter().map(PathBuf::as_path).zip(tops.iter().copied()).collect();
    let totals = check_and_extract(&archives, staging.path(), &options.limits)?;
    let mut staged = BTreeMap::new();
    for (path, top) in &archives {
        if !staging.path().join(top).is_dir() {
            bail!("`{}` does not contain the `{top}/` folder", path.display());
        }
        staged.append(&mut list_tree(staging.path(), top)?);
    }

    // Whose are the folders already there? segctl's when everything in them is recorded or is
    // exactly what these archives hold; the user's otherwise.
    let mut foreign = Vec::new();
    for top in &present {
        let known: Vec<&BTreeMap<String, TreeEntry>> = recorded.into_iter().chain([&staged]).collect();
        let example = if is_synthetic { Some((*top).to_string()) } else { foreign_entry(root, top, &known)? };
        if let Some(example) = example {
            foreign.push((*top, example));
        }
    }
    if !foreign.is_empty() && !options.force {
        return Err(refusal(root, &foreign));
    }
    let trash = if foreign.is_empty() && !is_synthetic { None } else { Some(create_trash(root)?) };
    if let Some(trash) = &trash {
        for (top, _) in &foreign {
            rename(&root.join(top), &trash.join(top))?;
            log::warn!("moved `{}` to `{}`", root.join(top).display(), trash.join(top).display());
        }
        if is_synthetic {
            rename(&synthetic, &trash.join(super::synthetic::MARKER_FILE))?;
        }
    }
    // Replace: segctl's old folders into the staging folder (deleted with it), the state file
    // saying what the folders now become, the new folders into place, the state complete.
    // A run killed anywhere here leaves folders the next run recognises as segctl's.
    let old = staging.path().join(".old");
    crate::util::fs::create_dir_all(&old)?;
    for top in &present {
        let path = root.join(top);
        if std::fs::symlink_metadata(&path).is_ok() {
            rename(&path, &old.join(top))?;
        }
    }
    let mut state = FetchState { archives: expected, complete: false, files: staged };
    write_state(&state_path, &state)?;
    for top in &tops {
        rename(&staging.path().join(top), &root.join(top))?;
    }
    crate::util::fs::sync_dir(root)?;
    state.complete = true;
    write_state(&state_path, &state)?;
    drop(staging);
    Ok(FetchReport {
        root: root.clone(),
        already_complete: false,
        archives: reports,
        extracted_files: totals.files,
        extracted_bytes: totals.bytes,
        moved_to_trash: foreign.iter().map(|(top, _)| top.to_string()).collect(),
        trash,
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

/// Running totals of an extraction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractTotals {
    /// Archive members seen (files, folders, links).
    pub members: u64,
    /// Regular files (and hard links to them).
    pub files: u64,
    pub bytes: u64,
}

/// Checks every member of the archives first, without writing anything (paths, kinds, links,
/// the caps), then extracts them into `dest`, checking again as it goes. Each archive is
/// `(path, top folder)`: its links must resolve inside its top folder, the part moved into place.
pub fn check_and_extract(archives: &[(&Path, &str)], dest: &Path, limits: &ExtractLimits) -> Result<ExtractTotals> {
    for write in [false, true] {
        let mut totals = ExtractTotals::default();
        let mut tree = Extracted::default();
        for (path, top) in archives {
            if write {
                log::info!("extracting {}", path.display());
            }
            extract_tar_gz(path, top, write.then_some(dest), limits, &mut totals, &mut tree)
                .with_context(|| format!("failed to extract `{}`", path.display()))?;
        }
        if write {
            return Ok(totals);
        }
    }
    unreachable!("the loop returns on its second pass")
}

/// What the archives extract, by path relative to the destination, so links are resolved
/// against what exists (as the OS will resolve them), not lexically.
#[derive(Default)]
struct Extracted {
    nodes: HashMap<PathBuf, Node>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir,
    File,
    Symlink(PathBuf),
}

impl Extracted {
    /// Every folder on the way to `path` must be a folder (extracted or implied), never a file
    /// or a link; implied folders are recorded.
    fn check_parents(&mut self, path: &Path) -> Result<(), String> {
        let mut prefix = PathBuf::new();
        let components: Vec<_> = path.components().collect();
        for c in &components[..components.len().saturating_sub(1)] {
            prefix.push(c);
            match self.nodes.get(&prefix) {
                None => {
                    self.nodes.insert(prefix.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => return Err(format!("`{}` on its path is not a folder", prefix.display())),
            }
        }
        Ok(())
    }

    /// Resolves a symbolic link's `target`, read from folder `from`, step by step through what
    /// was extracted (following links, as the OS would). The result is where it leads.
    fn resolve(&self, from: &[OsString], target: &Path, hops: &mut u32) -> Result<Vec<OsString>, String> {
        let mut cur = from.to_vec();
        let components: Vec<Component> = target.components().collect();
        for (i, c) in components.iter().enumerate() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    if cur.pop().is_none() {
                        return Err("points outside the destination".into());
                    }
                }
                Component::Normal(name) => {
                    cur.push(name.to_os_string());
                    let here: PathBuf = cur.iter().collect();
                    match self.nodes.get(&here) {
                        None => return Err(format!("points to `{}`, which nothing extracted before it", here.display())),
                        Some(Node::Dir) => {}
                        Some(Node::File) if i + 1 == components.len() => {}
                        Some(Node::File) => return Err(format!("goes through the file `{}`", here.display())),
                        Some(Node::Symlink(next)) => {
                            *hops += 1;
                            if *hops > MAX_LINK_HOPS {
                                return Err("is a chain of links too long to follow".into());
                            }
                            cur.pop();
                            cur = self.resolve(&cur, next, hops)?;
                        }
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err("points outside the destination (absolute target)".into()),
            }
        }
        Ok(cur)
    }
}

/// Turns a member name into a relative path without `.` components, refusing `..` and
/// absolute names.
fn normalize_member(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => bail!("refusing archive member `{}`: it contains `..`", path.display()),
            Component::RootDir | Component::Prefix(_) => {
                bail!("refusing archive member `{}`: absolute path", path.display())
            }
        }
    }
    Ok(out)
}

/// Checks each member of one `.tar.gz` and, with `dest`, extracts it there.
fn extract_tar_gz(
    archive: &Path,
    top: &str,
    dest: Option<&Path>,
    limits: &ExtractLimits,
    totals: &mut ExtractTotals,
    tree: &mut Extracted,
) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("failed to open `{}`", archive.display()))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    tar.set_preserve_mtime(false);
    for entry in tar.entries().context("not a tar archive")? {
        let mut entry = entry.context("corrupt tar archive")?;
        totals.members += 1;
        if totals.members > limits.max_members {
            bail!("the archives hold more than {} members (data.fetch.max_members); refusing", limits.max_members);
        }
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            continue;
        }
        let raw = entry.path().context("member with an unreadable name")?.into_owned();
        let path = normalize_member(&raw)?;
        if path.as_os_str().is_empty() {
            if kind == tar::EntryType::Directory {
                continue; // `./`, the destination itself
            }
            bail!("refusing archive member `{}`: it has no name", raw.display());
        }
        let refuse = |why: String| anyhow!("refusing archive member `{}`: {why}", raw.display());
        tree.check_parents(&path).map_err(refuse)?;
        if let Some(existing) = tree.nodes.get(&path)
            && !(kind == tar::EntryType::Directory && *existing == Node::Dir)
        {
            return Err(refuse("it appears twice in the archives".into()));
        }
        let in_top = |p: &[OsString]| p.first().is_some_and(|c| c == top);
        let node = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if size > limits.max_member_bytes {
                    return Err(refuse(format!(
                        "it is {size} bytes, more than data.fetch.max_member_bytes ({})",
                        limits.max_member_bytes
                    )));
                }
                if totals.bytes.saturating_add(size) > limits.max_bytes {
                    bail!("archive expands past the cap on extracted size (data.fetch.max_extract_bytes); refusing");
                }
                totals.bytes += size;
                totals.files += 1;
                Node::File
            }
            tar::EntryType::Directory => Node::Dir,
            tar::EntryType::Symlink => {
                let target = entry.link_name().context("link without a target")?.map(|t| t.into_owned());
                let target = target.ok_or_else(|| refuse("a link without a target".into()))?;
                let from: Vec<OsString> = path.parent().unwrap_or(Path::new("")).iter().map(|c| c.to_os_string()).collect();
                let resolved = tree
                    .resolve(&from, &target, &mut 0)
                    .map_err(|why| refuse(format!("link to `{}` {why}", target.display())))?;
                if !in_top(&resolved) {
                    return Err(refuse(format!("link to `{}` points outside `{top}/`", target.display())));
                }
                Node::Symlink(target)
            }
            tar::EntryType::Link => {
                // A hard link names an earlier member by its full path; it must be a regular
                // file reached through folders only.
                let target = entry.link_name().context("link without a target")?.map(|t| t.into_owned());
                let target = target.ok_or_else(|| refuse("a link without a target".into()))?;
                let named = normalize_member(&target).map_err(|_| refuse(format!("hard link to `{}` points outside the destination", target.display())))?;
                let parts: Vec<OsString> = named.iter().map(|c| c.to_os_string()).collect();
                let mut prefix = PathBuf::new();
                for (i, part) in parts.iter().enumerate() {
                    prefix.push(part);
                    let want_file = i + 1 == parts.len();
                    match tree.nodes.get(&prefix) {
                        Some(Node::Dir) if !want_file => {}
                        Some(Node::File) if want_file => {}
                        _ => {
                            return Err(refuse(format!(
                                "hard link to `{}` does not name a file extracted before it",
                                target.display()
                            )));
                        }
                    }
                }
                if !in_top(&parts) {
                    return Err(refuse(format!("hard link to `{}` points outside `{top}/`", target.display())));
                }
                totals.files += 1;
                Node::File
            }
            tar::EntryType::GNUSparse => return Err(refuse("sparse files are not allowed".into())),
            other => return Err(refuse(format!("{other:?} entries (devices, FIFOs) are not allowed"))),
        };
        tree.nodes.insert(path.clone(), node);
        // Only `<top>/` is moved into the root; anything beside it is not extracted.
        let under_top = path.components().next().is_some_and(|c| c.as_os_str() == top);
        if !under_top {
            log::debug!("skipping archive member `{}`: outside `{top}/`", raw.display());
            continue;
        }
        if let Some(dest) = dest {
            let unpacked = entry.unpack_in(dest).with_context(|| format!("failed to extract `{}`", raw.display()))?;
            if !unpacked {
                return Err(refuse("it would land outside the destination".into()));
            }
        }
    }
    Ok(())
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

    /// Raw tar members (names written as given, bypassing the tar crate's own checks).
    enum M<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    const LIMITS: ExtractLimits = ExtractLimits { max_bytes: 1 << 20, max_members: 100, max_member_bytes: 1 << 16 };

    fn extract(members: &[M], limits: &ExtractLimits) -> (Result<ExtractTotals>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("images.tar.gz");
        let gz = flate2::write::GzEncoder::new(File::create(&archive).unwrap(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        for m in members {
            let mut header = tar::Header::new_old();
            let (name, data, kind, link): (&str, &[u8], _, Option<&str>) = match m {
                M::File(n, d) => (n, d, tar::EntryType::Regular, None),
                M::Dir(n) => (n, &[], tar::EntryType::Directory, None),
                M::Sym(n, t) => (n, &[], tar::EntryType::Symlink, Some(t)),
                M::Hard(n, t) => (n, &[], tar::EntryType::Link, Some(t)),
            };
            let raw = header.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = link {
                raw.linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        (check_and_extract(&[(archive.as_path(), "images")], &dest, limits), dir)
    }

    fn refused(members: &[M], expect: &str) {
        let (result, dir) = extract(members, &LIMITS);
        let err = format!("{:#}", result.expect_err("refused"));
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
        assert_eq!(std::fs::read_dir(dir.path().join("dest")).unwrap().count(), 0, "nothing written: {err}");
    }

    #[test]
    fn links_resolve_against_what_was_extracted() {
        let (result, dir) = extract(
            &[
                M::Dir("images/"),
                M::File("./images/a.jpg", b"jpeg"),
                M::Sym("images/b.jpg", "a.jpg"),
                M::Sym("images/c.jpg", "./b.jpg"),
                M::Sym("images/self", "."),
                M::Sym("images/d.jpg", "self/self/c.jpg"),
                M::Hard("images/e.jpg", "images/a.jpg"),
            ],
            &LIMITS,
        );
        assert_eq!(result.unwrap(), ExtractTotals { members: 7, files: 2, bytes: 4 });
        for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"] {
            assert_eq!(std::fs::read(dir.path().join("dest/images").join(name)).unwrap(), b"jpeg", "{name}");
        }
    }

    #[test]
    fn hostile_links_are_refused() {
        // The lexical check passed this one: `x` is `.`, so x/x/x/../../../.. climbs out.
        refused(&[M::Sym("images/x", "."), M::Sym("images/a.jpg", "x/x/x/../../../../dev/zero")], "points outside the destination");
        refused(&[M::Sym("images/a", "/etc/passwd")], "absolute target");
        refused(&[M::Sym("images/a", "later.jpg"), M::File("images/later.jpg", b"x")], "nothing extracted before it");
        refused(&[M::Sym("images/d", "."), M::File("images/d/evil", b"x")], "not a folder");
        refused(&[M::File("images/a", b"x"), M::Sym("images/a", "b")], "appears twice");
        refused(&[M::File("annotations/list.txt", b"x"), M::Sym("images/l", "../annotations/list.txt")], "points outside `images/`");
        refused(&[M::Sym("images/l1", "l2"), M::Sym("images/l2", "l1")], "nothing extracted before it");
        // Hard links: only to a regular file extracted earlier, never to a link or outside.
        refused(&[M::File("images/a", b"x"), M::Sym("images/s", "a"), M::Hard("images/h", "images/s")], "does not name a file");
        refused(&[M::Hard("images/h", "../../etc/passwd")], "points outside");
        refused(&[M::Sym("images/d", "."), M::File("images/a", b"x"), M::Hard("images/h", "images/d/a")], "does not name a file");
        refused(&[M::File("../evil.txt", b"x")], "contains `..`");
        refused(&[M::File("/tmp/evil.txt", b"x")], "absolute path");
    }

    #[test]
    fn member_count_and_size_are_capped() {
        let many: Vec<String> = (0..5).map(|i| format!("images/{i}")).collect();
        let members: Vec<M> = many.iter().map(|n| M::File(n, b"")).collect();
        let (result, _dir) = extract(&members, &ExtractLimits { max_members: 4, ..LIMITS });
        assert!(format!("{:#}", result.unwrap_err()).contains("data.fetch.max_members"));
        let (result, _dir) = extract(&[M::File("images/big", &[0u8; 100])], &ExtractLimits { max_member_bytes: 99, ..LIMITS });
        assert!(format!("{:#}", result.unwrap_err()).contains("more than data.fetch.max_member_bytes (99)"));
        let (result, _dir) = extract(&[M::File("images/a", &[0u8; 60]), M::File("images/b", &[0u8; 60])], &ExtractLimits { max_bytes: 100, ..LIMITS });
        assert!(format!("{:#}", result.unwrap_err()).contains("data.fetch.max_extract_bytes"));
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
