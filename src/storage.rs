//! Object storage behind `s3://`, `gs://` and `az://` URLs (the `object_store` crate: one API
//! over S3, GCS and Azure), wherever segctl takes a path: datasets, run folders, checkpoints,
//! model repositories, `predict`'s inputs and outputs. `file://` URLs are plain local paths.
//!
//! Credentials, regions and endpoints come from the providers' usual environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, …) and then
//! the `storage.options` config section. Reads land in a local cache (`storage.cache_dir`)
//! keyed by each object's ETag, so a dataset read every epoch, or read again by the next run,
//! is downloaded once. Every object write is atomic for readers (S3, GCS and Azure publish an
//! object whole); multi-file things are published by a last small object readers wait for
//! (an exported version's `model.yaml`).
//!
//! The calls are synchronous: each runs on a small runtime of its own, so callers may be plain
//! threads or tasks of another runtime.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::StorageConfig;

/// Objects larger than this are uploaded in parts.
const MULTIPART_BYTES: u64 = 64 << 20;

static SETTINGS: RwLock<Option<StorageConfig>> = RwLock::new(None);

/// Sets the storage settings of this process (the loaded config's `storage` section). Keys of
/// `storage.options` that no provider knows are refused, naming the key.
pub fn configure(config: &StorageConfig) -> Result<()> {
    for key in config.options.keys() {
        let k = key.to_ascii_lowercase();
        let known = k.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok()
            || k.parse::<object_store::gcp::GoogleConfigKey>().is_ok()
            || k.parse::<object_store::azure::AzureConfigKey>().is_ok();
        if !known {
            bail!("key `storage.options.{key}`: not an option of object_store's S3, GCS or Azure stores (e.g. aws_endpoint_url, aws_allow_http, google_service_account, azure_storage_account_name)");
        }
    }
    *SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = Some(config.clone());
    Ok(())
}

fn settings() -> StorageConfig {
    SETTINGS.read().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
}

/// Where the cache lives: `storage.cache_dir`, else `SEGCTL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/segctl`, else `~/.cache/segctl`.
/// The lock file of the cache entry for `url`: kept apart from the mirrored files, so that it
/// is never taken for one of them (listed, validated or uploaded).
pub fn lock_path(url: &str) -> PathBuf {
    cache_root().join("locks").join(format!("{}.lock", &crate::util::sha256_hex(url.as_bytes())[..24]))
}

pub fn cache_root() -> PathBuf {
    if let Some(dir) = settings().cache_dir {
        return dir;
    }
    if let Some(dir) = std::env::var_os("SEGCTL_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("segctl");
    }
    std::env::var_os("HOME").map_or_else(|| std::env::temp_dir().join("segctl-cache"), |h| PathBuf::from(h).join(".cache/segctl"))
}

const SCHEMES: [&str; 7] = ["s3", "s3a", "gs", "az", "abfs", "abfss", "azure"];

/// Whether `path` is an object-store URL (`s3://`, `gs://`, `az://`, …; not `file://`).
pub fn is_url(path: &Path) -> bool {
    path.to_str().and_then(|s| s.split_once("://")).is_some_and(|(scheme, _)| SCHEMES.contains(&scheme))
}

/// A `file://` URL as the local path it names; anything else unchanged.
pub fn local_path(path: &Path) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_prefix("file://")) {
        Some(rest) => PathBuf::from(rest),
        None => path.to_path_buf(),
    }
}

/// The store behind `path`, when it is an object-store URL.
pub fn remote(path: &Path) -> Result<Option<Remote>> {
    if !is_url(path) {
        return Ok(None);
    }
    let text = path.to_str().context("object-store URLs are UTF-8")?;
    Remote::parse(text).map(Some)
}

/// One object, relative to the prefix it was listed under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    /// Key below the prefix, `/`-separated.
    pub rel: String,
    pub size: u64,
    pub e_tag: Option<String>,
    /// Seconds since the epoch.
    pub modified: i64,
}

/// A prefix (or single object) in an object store.
#[derive(Clone)]
pub struct Remote {
    url: String,
    scheme: String,
    bucket: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// A store by (scheme, bucket).
type StoreEntry = ((String, String), Arc<dyn ObjectStore>);

/// Stores built so far (each holds its connection pool).
static STORES: Mutex<Vec<StoreEntry>> = Mutex::new(Vec::new());

impl Remote {
    /// Parses `scheme://bucket/prefix`.
    pub fn parse(url: &str) -> Result<Remote> {
        let (scheme, rest) = url.split_once("://").with_context(|| format!("`{url}` is not a URL"))?;
        if !SCHEMES.contains(&scheme) {
            bail!("`{url}`: unsupported scheme `{scheme}` (use s3://, gs://, az:// or a local path)");
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("`{url}` names no bucket");
        }
        let key = key.trim_matches('/');
        let prefix = ObjPath::parse(key).with_context(|| format!("`{url}`: `{key}` is not a valid object key"))?;
        let store = store_for(scheme, bucket, url)?;
        let url = if key.is_empty() { format!("{scheme}://{bucket}") } else { format!("{scheme}://{bucket}/{key}") };
        Ok(Remote { url, scheme: scheme.to_string(), bucket: bucket.to_string(), store, prefix })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A prefix of an in-memory store (tests).
    #[cfg(test)]
    fn in_memory(bucket: &str, store: Arc<dyn ObjectStore>) -> Remote {
        Remote { url: format!("s3://{bucket}"), scheme: "s3".into(), bucket: bucket.into(), store, prefix: ObjPath::from("") }
    }

    /// The prefix `rel` below this one.
    pub fn child(&self, rel: &str) -> Remote {
        let rel = rel.trim_matches('/');
        let mut next = self.clone();
        if rel.is_empty() {
            return next;
        }
        next.url = format!("{}/{rel}", self.url);
        next.prefix = ObjPath::from(format!("{}/{rel}", self.prefix.as_ref()).trim_start_matches('/'));
        next
    }

    /// The parent prefix and the last segment (`s3://b/a/c` → (`s3://b/a`, `c`)).
    pub fn split_last(&self) -> Option<(Remote, String)> {
        let key = self.prefix.as_ref();
        let (parent, last) = key.rsplit_once('/').unwrap_or(("", key));
        if last.is_empty() {
            return None;
        }
        let mut up = self.clone();
        up.prefix = ObjPath::from(parent);
        up.url = if parent.is_empty() { format!("{}://{}", self.scheme, self.bucket) } else { format!("{}://{}/{parent}", self.scheme, self.bucket) };
        Some((up, last.to_string()))
    }

    fn key(&self, rel: &str) -> ObjPath {
        let rel = rel.trim_matches('/');
        match (self.prefix.as_ref().is_empty(), rel.is_empty()) {
            (_, true) => self.prefix.clone(),
            (true, false) => ObjPath::from(rel),
            (false, false) => ObjPath::from(format!("{}/{rel}", self.prefix.as_ref())),
        }
    }

    /// Every object below the prefix, sorted by key.
    pub fn list(&self) -> Result<Vec<Object>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let base = self.prefix.as_ref().to_string();
        let metas = block(async move {
            let mut stream = store.list(if prefix.as_ref().is_empty() { None } else { Some(&prefix) });
            let mut out = Vec::new();
            while let Some(meta) = stream.next().await {
                out.push(meta?);
            }
            Ok::<_, object_store::Error>(out)
        })
        .with_context(|| format!("failed to list `{}`", self.url))?;
        let mut objects: Vec<Object> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref();
                let rel = if base.is_empty() { key } else { key.strip_prefix(base.as_str())?.strip_prefix('/')? };
                Some(Object { rel: rel.to_string(), size: m.size, e_tag: m.e_tag, modified: m.last_modified.timestamp() })
            })
            .collect();
        objects.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(objects)
    }

    /// The names directly below the prefix that hold objects (its "folders").
    pub fn list_children(&self) -> Result<Vec<String>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let listed = block(async move { store.list_with_delimiter(if prefix.as_ref().is_empty() { None } else { Some(&prefix) }).await })
            .with_context(|| format!("failed to list `{}`", self.url))?;
        let mut names: Vec<String> = listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// The object at `rel` below the prefix, if there is one.
    pub fn head(&self, rel: &str) -> Result<Option<Object>> {
        let store = self.store.clone();
        let key = self.key(rel);
        match block(async move { store.head(&key).await }) {
            Ok(m) => Ok(Some(Object { rel: rel.to_string(), size: m.size, e_tag: m.e_tag, modified: m.last_modified.timestamp() })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read `{}`", self.child(rel).url)),
        }
    }

    /// Streams the object at `rel` into `dest` (a temporary file renamed into place, so `dest`
    /// is whole or absent), refusing more than `storage.max_object_bytes`.
    pub fn download(&self, rel: &str, dest: &Path) -> Result<Object> {
        let max = settings().max_object_bytes;
        let url = self.child(rel).url;
        if let Some(dir) = dest.parent() {
            crate::util::fs::create_dir_all(dir)?;
        }
        let tmp = temp_beside(dest);
        let store = self.store.clone();
        let key = self.key(rel);
        let tmp_path = tmp.clone();
        let result = block(async move {
            let got = store.get(&key).await?;
            let meta = got.meta.clone();
            if meta.size > max {
                return Ok(Err(meta.size));
            }
            let mut file = std::fs::File::create(&tmp_path).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
            let mut stream = got.into_stream();
            let mut written = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                if written > max {
                    return Ok(Err(written));
                }
                file.write_all(&chunk).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
            }
            file.sync_all().map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
            Ok::<_, object_store::Error>(Ok(meta))
        });
        let meta = match result {
            Ok(Ok(meta)) => meta,
            Ok(Err(size)) => {
                let _ = std::fs::remove_file(&tmp);
                bail!("`{url}` holds more than storage.max_object_bytes ({max} bytes; at least {size})");
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("failed to download `{url}`"));
            }
        };
        std::fs::rename(&tmp, dest).with_context(|| format!("failed to write `{}`", dest.display()))?;
        Ok(Object { rel: rel.to_string(), size: meta.size, e_tag: meta.e_tag, modified: meta.last_modified.timestamp() })
    }

    /// The bytes of the object at `rel`, at most `max` of them.
    pub fn read(&self, rel: &str, max: u64) -> Result<Vec<u8>> {
        let url = self.child(rel).url;
        let store = self.store.clone();
        let key = self.key(rel);
        let out = block(async move {
            let got = store.get(&key).await?;
            if got.meta.size > max {
                return Ok(Err(got.meta.size));
            }
            let mut bytes = Vec::with_capacity(got.meta.size as usize);
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if (bytes.len() + chunk.len()) as u64 > max {
                    return Ok(Err((bytes.len() + chunk.len()) as u64));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, object_store::Error>(Ok(bytes))
        })
        .with_context(|| format!("failed to read `{url}`"))?;
        out.map_err(|size| anyhow::anyhow!("`{url}` is larger than the {max} bytes allowed here ({size})"))
    }

    /// Writes `bytes` at `rel` (replacing what was there; readers see the old or the new).
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let store = self.store.clone();
        let key = self.key(rel);
        block(async move { store.put(&key, PutPayload::from(bytes)).await }).with_context(|| format!("failed to write `{}`", self.child(rel).url))?;
        Ok(())
    }

    /// Writes `bytes` at `rel` only if nothing is there yet; `false` when something was.
    pub fn put_new(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        let store = self.store.clone();
        let key = self.key(rel);
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        match block(async move { store.put_opts(&key, PutPayload::from(bytes), options).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("failed to write `{}`", self.child(rel).url)),
        }
    }

    /// Claims the name `rel` (a version, a run) for this process by creating
    /// `<rel>/.segctl-claim` only if absent; `false` when another process holds it.
    pub fn claim(&self, rel: &str) -> Result<bool> {
        let body = serde_json::to_vec(&serde_json::json!({ "pid": std::process::id(), "created": crate::util::utc_timestamp() }))?;
        self.put_new(&format!("{rel}/{}", crate::util::fs::BUCKET_CLAIM), body)
    }

    /// Uploads the file `src` to `rel` (in parts when large); the object appears whole.
    pub fn upload(&self, rel: &str, src: &Path) -> Result<()> {
        let size = std::fs::metadata(src).with_context(|| format!("failed to read `{}`", src.display()))?.len();
        if size <= MULTIPART_BYTES {
            return self.put(rel, crate::util::fs::read(src)?);
        }
        let store = self.store.clone();
        let key = self.key(rel);
        let src = src.to_path_buf();
        block(async move {
            let upload = store.put_multipart(&key).await?;
            let mut writer = object_store::WriteMultipart::new(upload);
            let mut file = std::fs::File::open(&src).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| object_store::Error::Generic { store: "local", source: Box::new(e) })?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(4).await?;
                writer.write(&buf[..n]);
            }
            writer.finish().await
        })
        .with_context(|| format!("failed to upload to `{}`", self.child(rel).url))?;
        Ok(())
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        let store = self.store.clone();
        let key = self.key(rel);
        match block(async move { store.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to delete `{}`", self.child(rel).url)),
        }
    }

    /// Where this prefix is mirrored in the local cache.
    pub fn cache_dir(&self) -> PathBuf {
        let mut dir = cache_root().join("objects").join(&self.scheme).join(&self.bucket);
        for part in self.prefix.parts() {
            dir.push(part.as_ref());
        }
        dir
    }

    /// The ETag index of what was downloaded from this prefix (kept outside the mirror, so
    /// a mirrored dataset holds only the dataset's files).
    fn index_path(&self) -> PathBuf {
        cache_root().join("objects/.index").join(format!("{}.json", &crate::util::sha256_hex(self.url.as_bytes())[..32]))
    }
}

fn temp_beside(dest: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!("{}{name}.{}.{n}", crate::util::fs::TEMP_PREFIX, std::process::id()))
}

fn store_for(scheme: &str, bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    let id = (scheme.to_string(), bucket.to_string());
    let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, store)) = stores.iter().find(|(k, _)| *k == id) {
        return Ok(store.clone());
    }
    let s = settings();
    let retry = object_store::RetryConfig { max_retries: s.retries, retry_timeout: Duration::from_secs(s.timeout_s), ..Default::default() };
    // Timeouts as config keys (with_client_options would drop what from_env set, such as
    // AWS_ALLOW_HTTP); the config section's options last.
    let mut options: Vec<(String, String)> = vec![
        ("timeout".into(), format!("{}s", s.timeout_s)),
        ("connect_timeout".into(), format!("{}s", s.timeout_s.min(10))),
    ];
    options.extend(s.options.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    let root = format!("{scheme}://{bucket}");
    // The three providers' builders share their shape: environment, URL, retries, options.
    macro_rules! build {
        ($builder:ty, $what:literal) => {{
            let mut b = <$builder>::from_env().with_url(&root).with_retry(retry);
            for (k, v) in &options {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.build().with_context(|| format!("`{url}`: cannot set up the {} client", $what))?) as Arc<dyn ObjectStore>
        }};
    }
    let store = match scheme {
        "s3" | "s3a" => build!(object_store::aws::AmazonS3Builder, "S3"),
        "gs" => build!(object_store::gcp::GoogleCloudStorageBuilder, "GCS"),
        _ => build!(object_store::azure::MicrosoftAzureBuilder, "Azure"),
    };
    stores.push((id, store.clone()));
    Ok(store)
}

/// Runs `future` on the storage runtime and waits for it, from any thread (also a task of
/// another runtime: the future runs on this module's own threads).
fn block<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("segctl-storage")
            .enable_all()
            .build()
            .expect("the storage runtime starts")
    });
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().expect("the storage runtime answers")
}

/// What the mirror index remembers of each file: the object it was downloaded from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    files: BTreeMap<String, (u64, Option<String>)>,
}

fn write_index(path: &Path, index: &Index) -> Result<()> {
    if let Some(dir) = path.parent() {
        crate::util::fs::create_dir_all(dir)?;
    }
    crate::util::fs::write_atomic(path, &serde_json::to_vec(index)?)
}

fn read_index(path: &Path) -> Index {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// What [`mirror`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MirrorReport {
    pub downloaded: usize,
    pub reused: usize,
    pub removed: usize,
    pub bytes: u64,
}

/// Makes `local` hold exactly the objects below `remote` (as files, `/` → folders): objects
/// whose ETag and size match what was downloaded before are not fetched again; files whose
/// object is gone are removed. A failed listing changes nothing.
pub fn mirror(remote: &Remote, local: &Path) -> Result<MirrorReport> {
    let objects = remote.list()?;
    let index_path = remote.index_path();
    let mut index = read_index(&index_path);
    let mut report = MirrorReport::default();
    let mut seen = std::collections::HashSet::new();
    for object in &objects {
        if object.rel.split('/').any(|p| p.is_empty() || p == "." || p == ".." || p.starts_with(crate::util::fs::TEMP_PREFIX)) {
            log::warn!("skipping object `{}/{}`: not a usable file name", remote.url(), object.rel);
            continue;
        }
        seen.insert(object.rel.clone());
        let dest = local.join(&object.rel);
        let known = index.files.get(&object.rel);
        let fresh = known.is_some_and(|(size, tag)| *size == object.size && *tag == object.e_tag && object.e_tag.is_some())
            && std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == object.size);
        if fresh {
            report.reused += 1;
            continue;
        }
        let got = remote.download(&object.rel, &dest)?;
        report.downloaded += 1;
        report.bytes += got.size;
        index.files.insert(object.rel.clone(), (got.size, got.e_tag));
    }
    let stale: Vec<String> = index.files.keys().filter(|k| !seen.contains(*k)).cloned().collect();
    for rel in stale {
        crate::util::fs::remove_file_if_exists(&local.join(&rel))?;
        index.files.remove(&rel);
        report.removed += 1;
    }
    write_index(&index_path, &index)?;
    Ok(report)
}

/// Paths already localized in this process (a dataset opened for train and val is mirrored
/// once).
static LOCALIZED: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// A local path for `path`: itself when local (`file://` stripped); for a URL, the object
/// downloaded into the cache (when it names one object) or the prefix mirrored there.
pub fn localize(path: &Path) -> Result<PathBuf> {
    let Some(remote) = remote(path)? else { return Ok(local_path(path)) };
    if let Some((_, local)) = LOCALIZED.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(u, _)| u == remote.url()) {
        return Ok(local.clone());
    }
    let local = remote.cache_dir();
    // Processes sharing the cache take turns filling it (the second finds the files fresh).
    let _lock = crate::util::fs::DirLock::wait(&lock_path(remote.url()))?;
    let single = match remote.split_last() {
        Some((parent, name)) => parent.head(&name)?.map(|o| (parent, name, o)),
        None => None,
    };
    match single {
        Some((parent, name, object)) => {
            let index_path = remote.index_path();
            let known = read_index(&index_path);
            let fresh = known.files.get(&name).is_some_and(|(size, tag)| *size == object.size && *tag == object.e_tag && object.e_tag.is_some())
                && std::fs::metadata(&local).is_ok_and(|m| m.is_file() && m.len() == object.size);
            if !fresh {
                log::info!("downloading `{}` ({} bytes)", remote.url(), object.size);
                let got = parent.download(&name, &local)?;
                let mut index = Index::default();
                index.files.insert(name, (got.size, got.e_tag));
                write_index(&index_path, &index)?;
            }
        }
        None => {
            let report = mirror(&remote, &local)?;
            if report.downloaded + report.reused == 0 {
                bail!("`{}` holds no objects", remote.url());
            }
            log::info!(
                "`{}`: {} objects downloaded ({} bytes), {} up to date in the cache `{}`",
                remote.url(),
                report.downloaded,
                report.bytes,
                report.reused,
                local.display()
            );
        }
    }
    LOCALIZED.lock().unwrap_or_else(|e| e.into_inner()).push((remote.url().to_string(), local.clone()));
    Ok(local)
}

/// Uploads every file below `local` to `remote` (files in `last` after the others), skipping
/// segctl's own bookkeeping at the top (`.segctl-*`: locks, fetch state, trash), and records
/// the objects' ETags so the next read of `remote` reuses these files instead of downloading.
pub fn upload_dir(local: &Path, remote: &Remote, last: &[&str]) -> Result<usize> {
    let mut sync = DirSync::new(local.to_path_buf(), remote.clone());
    sync.skip_top_level_prefix = Some(".segctl");
    let uploaded = sync.push(last)?;
    let objects = remote.list()?;
    let mut index = Index::default();
    for o in objects {
        if std::fs::metadata(local.join(&o.rel)).is_ok_and(|m| m.is_file() && m.len() == o.size) {
            index.files.insert(o.rel, (o.size, o.e_tag));
        }
    }
    let index_path = remote.index_path();
    write_index(&index_path, &index)?;
    log::info!("uploaded {uploaded} files to `{}`", remote.url());
    Ok(uploaded)
}

/// Keeps a prefix in step with a local folder that only this process writes (a run folder):
/// [`DirSync::push`] uploads new and changed files and deletes the objects of files removed
/// since (pruned checkpoints). Each file is one object, replaced whole.
pub struct DirSync {
    pub local: PathBuf,
    pub remote: Remote,
    /// Top-level names starting with this are not uploaded.
    pub skip_top_level_prefix: Option<&'static str>,
    pushed: HashMap<String, (u64, std::time::SystemTime)>,
}

impl DirSync {
    pub fn new(local: PathBuf, remote: Remote) -> Self {
        Self { local, remote, skip_top_level_prefix: None, pushed: HashMap::new() }
    }

    fn files(&self) -> Result<Vec<(String, std::fs::Metadata)>> {
        let mut files = Vec::new();
        collect_files(&self.local, &self.local, &mut files)?;
        if let Some(skip) = self.skip_top_level_prefix {
            files.retain(|(rel, _)| !rel.starts_with(skip));
        }
        Ok(files)
    }

    /// Uploads what changed; files in `last` go after all others (a run's `summary.json`, so
    /// its presence means the rest is there).
    pub fn push(&mut self, last: &[&str]) -> Result<usize> {
        let mut files = self.files()?;
        files.sort_by_key(|(rel, _)| (last.contains(&rel.as_str()), rel.clone()));
        let mut uploaded = 0;
        let mut present = std::collections::HashSet::new();
        for (rel, meta) in files {
            present.insert(rel.clone());
            let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
            if self.pushed.get(&rel) == Some(&stamp) {
                continue;
            }
            self.remote.upload(&rel, &self.local.join(&rel))?;
            self.pushed.insert(rel, stamp);
            uploaded += 1;
        }
        let gone: Vec<String> = self.pushed.keys().filter(|k| !present.contains(*k)).cloned().collect();
        for rel in gone {
            self.remote.delete(&rel)?;
            self.pushed.remove(&rel);
        }
        Ok(uploaded)
    }

    /// Marks what is already in the store (a resumed run's files just mirrored down).
    pub fn assume_pushed(&mut self) -> Result<()> {
        for (rel, meta) in self.files()? {
            self.pushed.insert(rel, (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH)));
        }
        Ok(())
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, std::fs::Metadata)>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("failed to list `{}`", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(crate::util::fs::TEMP_PREFIX) {
            continue;
        }
        let meta = entry.metadata().with_context(|| format!("failed to read `{}`", entry.path().display()))?;
        if meta.is_dir() {
            collect_files(root, &entry.path(), out)?;
        } else if meta.is_file() {
            let rel = entry.path().strip_prefix(root).expect("below the root").to_string_lossy().replace('\\', "/");
            out.push((rel, meta));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url(Path::new("s3://bucket/runs")));
        assert!(is_url(Path::new("gs://b")));
        assert!(is_url(Path::new("az://container/x")));
        assert!(!is_url(Path::new("file:///tmp/x")));
        assert!(!is_url(Path::new("data/s3:/x")));
        assert_eq!(local_path(Path::new("file:///tmp/x")), PathBuf::from("/tmp/x"));
        assert_eq!(local_path(Path::new("rel/x")), PathBuf::from("rel/x"));
    }

    #[test]
    fn a_mirror_downloads_each_object_once_while_its_etag_holds() {
        let cache = tempfile::tempdir().unwrap();
        configure(&StorageConfig { cache_dir: Some(cache.path().to_path_buf()), ..Default::default() }).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let bucket = Remote::in_memory("mirror-test", store);
        let data = bucket.child("data");
        data.put("images/a.jpg", b"aaaa".to_vec()).unwrap();
        data.put("images/b.jpg", b"bbbbbb".to_vec()).unwrap();
        data.put("annotations/test.txt", b"a 1 1 1\n".to_vec()).unwrap();
        let local = data.cache_dir();
        let first = mirror(&data, &local).unwrap();
        assert_eq!((first.downloaded, first.reused, first.bytes), (3, 0, 18));
        assert_eq!(std::fs::read(local.join("images/b.jpg")).unwrap(), b"bbbbbb");
        // Again: nothing downloaded.
        let second = mirror(&data, &local).unwrap();
        assert_eq!((second.downloaded, second.reused), (0, 3));
        // One object replaced, one deleted: one download, one file removed.
        data.put("images/a.jpg", b"AAAA".to_vec()).unwrap();
        data.delete("images/b.jpg").unwrap();
        let third = mirror(&data, &local).unwrap();
        assert_eq!((third.downloaded, third.reused, third.removed), (1, 1, 1));
        assert_eq!(std::fs::read(local.join("images/a.jpg")).unwrap(), b"AAAA");
        assert!(!local.join("images/b.jpg").exists());
        // A file changed behind the cache's back is fetched again (its size no longer matches).
        std::fs::write(local.join("images/a.jpg"), b"tampered").unwrap();
        assert_eq!(mirror(&data, &local).unwrap().downloaded, 1);
        assert_eq!(std::fs::read(local.join("images/a.jpg")).unwrap(), b"AAAA");

        // DirSync uploads what changed and deletes what went.
        let run = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(run.path().join("checkpoints")).unwrap();
        std::fs::write(run.path().join("checkpoints/epoch-0001.safetensors"), b"1").unwrap();
        std::fs::write(run.path().join("summary.json"), b"{}").unwrap();
        let mut sync = DirSync::new(run.path().to_path_buf(), bucket.child("runs/r"));
        assert_eq!(sync.push(&["summary.json"]).unwrap(), 2);
        assert_eq!(sync.push(&["summary.json"]).unwrap(), 0, "nothing changed");
        std::fs::remove_file(run.path().join("checkpoints/epoch-0001.safetensors")).unwrap();
        std::fs::write(run.path().join("checkpoints/epoch-0002.safetensors"), b"2").unwrap();
        assert_eq!(sync.push(&["summary.json"]).unwrap(), 1);
        let keys: Vec<String> = bucket.child("runs/r").list().unwrap().into_iter().map(|o| o.rel).collect();
        assert_eq!(keys, ["checkpoints/epoch-0002.safetensors", "summary.json"]);
        // put_new refuses what exists.
        assert!(bucket.put_new("claim", b"x".to_vec()).unwrap());
        assert!(!bucket.put_new("claim", b"y".to_vec()).unwrap());
    }

    #[test]
    fn prefixes_compose() {
        // Building an S3 client makes no request.
        let r = Remote::parse("s3://bucket/runs/").unwrap();
        assert_eq!(r.url(), "s3://bucket/runs");
        let c = r.child("tiny/checkpoints");
        assert_eq!(c.url(), "s3://bucket/runs/tiny/checkpoints");
        assert_eq!(c.key("best.safetensors").as_ref(), "runs/tiny/checkpoints/best.safetensors");
        let (up, last) = c.split_last().unwrap();
        assert_eq!((up.url(), last.as_str()), ("s3://bucket/runs/tiny", "checkpoints"));
        let root = Remote::parse("s3://bucket").unwrap();
        assert_eq!(root.key("a/b").as_ref(), "a/b");
        assert!(root.split_last().is_none());
        assert!(Remote::parse("s3:///x").is_err());
        assert!(Remote::parse("ftp://x/y").is_err());
    }
}
