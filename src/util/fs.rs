//! File-system calls wrapped once with context in a fixed wording (cargo-util `paths.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("failed to read `{}`", path.display()))
}

/// Reads a whole UTF-8 file.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("failed to read `{}`", path.display()))
}

/// Creates a folder and its parents.
pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("failed to create folder `{}`", path.display()))
}

/// Name prefix of the temporary files [`write_atomic`] renames into place.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename, so a
/// reader (or a crash) never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| {
        use std::io::Write;
        file.write_all(bytes)?;
        Ok(())
    })
}

/// Like [`write_atomic`], with the content produced by `fill` into the temporary file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    create_dir_all(&dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&dir)
        .with_context(|| format!("failed to create a temporary file in `{}`", dir.display()))?;
    fill(tmp.as_file_mut()).with_context(|| format!("failed to write `{}`", path.display()))?;
    // Temporary files are private (0600); what we write is meant to be read by others too
    // (a model repository served by another user, a CI artifact).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("failed to write `{}`", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("failed to move the new `{}` into place", path.display()))?;
    Ok(())
}

/// [`write_atomic`], then the folder flushed too, so the new file survives a power cut under
/// its name (checkpoints, manifests, state files; not worth the cost for caches and outputs).
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)?;
    sync_dir(&parent_dir(path))
}

/// Flushes a folder's entries (new names, renames) to disk, so what was published into it
/// survives a power cut. A no-op where folders cannot be opened (not Unix).
pub fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("failed to flush folder `{}` to disk", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Flushes a file's content to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("failed to flush `{}` to disk", path.display()))
}

/// Removes what a killed run left in `dir`: every entry whose name starts with `prefix`
/// (temporary files of [`write_atomic`], staging folders). Only for folders the caller owns
/// exclusively (under a lock, or its own run folder). Returns how many were removed.
pub fn remove_leftovers(dir: &Path, prefix: &str) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dir_all_if_exists(&path)?;
        } else {
            remove_file_if_exists(&path)?;
        }
        log::info!("removed `{}`, left by an interrupted run", path.display());
        removed += 1;
    }
    Ok(removed)
}

/// An exclusive advisory lock on a file (`flock`), held until dropped. The operating system
/// releases it when the process dies, so a killed run never leaves a stale lock.
#[derive(Debug)]
pub struct FileLock {
    file: std::fs::File,
}

impl FileLock {
    /// Takes the lock on `path` (created if missing), or `None` when another process holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("failed to open lock file `{}`", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("failed to lock `{}`", path.display()))
            }
        }
    }

    /// Like [`FileLock::try_acquire`] for a lock file that must already exist: `None` when it
    /// does not (its owner has not created it yet, or it moved away) or another process holds it.
    pub fn try_acquire_existing(path: &Path) -> Result<Option<FileLock>> {
        let file = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("failed to open lock file `{}`", path.display())),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("failed to lock `{}`", path.display()))
            }
        }
    }

    /// Whether the locked file is still the one at `path` (not renamed away or replaced since
    /// it was opened).
    pub fn is_at(&self, path: &Path) -> bool {
        let (Ok(held), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else { return false };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            held.dev() == there.dev() && held.ino() == there.ino()
        }
        #[cfg(not(unix))]
        {
            held.len() == there.len()
        }
    }

    /// Takes the lock on `path`, waiting for another holder to let go.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("failed to open lock file `{}`", path.display()))?;
        file.lock().with_context(|| format!("failed to lock `{}`", path.display()))?;
        Ok(FileLock { file })
    }
}

/// The folder holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes a file if it exists.
pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("failed to remove `{}`", path.display())),
    }
}

/// Removes a folder tree if it exists.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("failed to remove `{}`", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn leftovers_are_removed_by_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmp-abc"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join(".tmp-dir/inner")).unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"y").unwrap();
        assert_eq!(remove_leftovers(dir.path(), ".tmp-").unwrap(), 2);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);
        assert_eq!(remove_leftovers(&dir.path().join("missing"), ".tmp-").unwrap(), 0);
    }

    #[test]
    fn a_lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = FileLock::try_acquire(&path).unwrap().expect("free lock");
        assert!(FileLock::try_acquire(&path).unwrap().is_none(), "a second holder is refused");
        drop(held);
        assert!(FileLock::try_acquire(&path).unwrap().is_some());
    }
}

/// The object that claims a name in a bucket (an exported version, a timestamped run): created
/// only if absent, so two processes never take the same name.
pub const BUCKET_CLAIM: &str = ".segctl-claim";

/// Name of the lock file a process holds in a folder it owns for a while (a training run).
pub const LOCK_FILE: &str = ".segctl-lock";

/// A lock file, opened for reading and writing (created if missing, kept as is).
fn open_lock_file(path: &Path) -> Result<(PathBuf, std::fs::File)> {
    let path = path.to_path_buf();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open `{}`", path.display()))?;
    Ok((path, file))
}

/// An exclusive advisory lock (`flock`) on `<dir>/.segctl-lock`, held until dropped; the
/// operating system releases it when the process dies, so a killed run leaves no stale lock.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Locks `dir` (which must exist) for `what`, or says which process holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let (path, mut file) = open_lock_file(&dir.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let by = if holder.is_empty() { String::new() } else { format!(" (process {holder})") };
                anyhow::bail!("`{}` is in use by another {what}{by}: wait for it to end, or use another folder", dir.display());
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("failed to lock `{}`", path.display())),
        }
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id())).with_context(|| format!("failed to write `{}`", path.display()))?;
        Ok(Self { _file: file })
    }
}

impl DirLock {
    /// Locks the file `path` (created, with its folder, if missing), waiting while another
    /// process holds it (a cache two processes fill: the second waits for the first, then
    /// finds the files in place).
    pub fn wait(path: &Path) -> Result<Self> {
        create_dir_all(&parent_dir(path))?;
        let (path, file) = open_lock_file(path)?;
        file.lock().with_context(|| format!("failed to lock `{}`", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// Creates `parent/name` exclusively (it must not exist yet); on a collision tries
/// `name-2`, `name-3`, … Returns the folder claimed.
pub fn create_unique_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    create_dir_all(parent)?;
    for n in 1..=1000 {
        let candidate = if n == 1 { parent.join(name) } else { parent.join(format!("{name}-{n}")) };
        match std::fs::create_dir(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to create folder `{}`", candidate.display())),
        }
    }
    anyhow::bail!("no free folder name `{name}-N` in `{}`", parent.display())
}
