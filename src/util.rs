//! Small shared helpers: atomic writes, cache directory, hashing.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: a temp file in the same directory, then rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    clear_stale_tmp(path);
    let tmp = tmp_sibling(path);
    let written = fault_point(&tmp)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    commit_point(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Build the directory `out` all-or-nothing: `fill` writes into a fresh temp sibling, which then
/// replaces `out` in one step (`renameat2(RENAME_EXCHANGE)`, so `out` is never missing; where
/// the filesystem lacks it, remove then rename). An existing `out` is an error unless `force`.
pub(crate) fn write_dir_atomic(out: &Path, force: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() && !force {
        anyhow::bail!("{}: already exists (use --force to replace it)", out.display());
    }
    clear_stale_tmp(out);
    let tmp = tmp_sibling(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fault_point(&tmp).map_err(anyhow::Error::from).and_then(|()| fill(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    commit_point(&tmp)?;
    if out.exists() && exchange(&tmp, out).is_ok() {
        // `tmp` now holds the old contents.
        return std::fs::remove_dir_all(&tmp).with_context(|| format!("removing old {}", tmp.display()));
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing old {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// Swap two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A hidden temp path beside `path` (same filesystem, so rename is atomic).
pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Remove temp siblings of `path` left by processes that are gone (killed mid-write): their
/// name ends in the writer's pid, and a pid with no process means nobody will finish them.
pub(crate) fn clear_stale_tmp(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_alive(pid) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Whether a process with this pid exists.
pub(crate) fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Injected faults for tests of crash safety, from `CODESPOT_FAULT`:
/// `kill@N` SIGKILLs this process at the N-th commit of an atomic write (the data is written,
/// the rename not yet done); `enospc@N` fails the N-th atomic write as a full disk would.
/// Unset (always, outside tests), both points do nothing.
#[derive(Clone, Copy)]
enum Fault {
    None,
    Kill(usize),
    Enospc(usize),
}

fn fault() -> Fault {
    static F: std::sync::OnceLock<Fault> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        let v = std::env::var("CODESPOT_FAULT").unwrap_or_default();
        let n = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0);
        match v.split_once('@') {
            Some(("kill", k)) => n(k).map_or(Fault::None, Fault::Kill),
            Some(("enospc", k)) => n(k).map_or(Fault::None, Fault::Enospc),
            _ => Fault::None,
        }
    })
}

static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static COMMITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn fault_point(_tmp: &Path) -> std::io::Result<()> {
    if let Fault::Enospc(n) = fault() {
        if WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    Ok(())
}

fn commit_point(_tmp: &Path) -> std::io::Result<()> {
    if let Fault::Kill(n) = fault() {
        if COMMITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
            // SAFETY: raising a signal on ourselves.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
    }
    Ok(())
}

/// codespot's cache: `$CODESPOT_CACHE`, else `$XDG_CACHE_HOME/codespot`, else `~/.cache/codespot`.
pub(crate) fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CODESPOT_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("codespot");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("codespot")
}

/// True when the user asked for no network (`HF_HUB_OFFLINE` or `CODESPOT_OFFLINE` set to 1/true).
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "CODESPOT_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false)
    })
}

/// SHA-256 of a file, hex (streams; fine for multi-GB files).
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An advisory lock (`flock`) that makes one process the writer of an output: held for the
/// life of the value, released by the kernel when the process dies, so a lock left by a killed
/// process is simply taken over. The file records the holder (pid, command line, start time)
/// for the message a second writer gets.
pub struct DirLock {
    file: std::fs::File,
}

impl DirLock {
    /// The only writer of `what` (e.g. a run directory): fails at once while another process
    /// holds the lock, shared or exclusive.
    pub fn exclusive(lock_path: &Path, what: &Path) -> Result<Self> {
        Self::take(lock_path, what, true)
    }

    /// One of several writers of separate parts of `what` (each tune of one language): fails
    /// while another process holds it exclusively.
    pub fn shared(lock_path: &Path, what: &Path) -> Result<Self> {
        Self::take(lock_path, what, false)
    }

    fn take(lock_path: &Path, what: &Path, exclusive: bool) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::io::AsRawFd;
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut lines = holder.lines();
                let pid = lines.next().unwrap_or("?");
                let cmd = lines.next().unwrap_or("?");
                anyhow::bail!(
                    "{} is being written by process {pid} ({cmd}); wait for it to finish or stop it (lock {})",
                    what.display(),
                    lock_path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", lock_path.display()));
        }
        // A holder recorded in the file but no longer holding the lock died without releasing it.
        if let Some(pid) = holder.lines().next().and_then(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: signal 0 only asks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                eprintln!(
                    "codespot: took over the lock of {} left by process {pid}, which is no longer running",
                    what.display()
                );
            }
        }
        let cmd: Vec<String> = std::env::args().collect();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}\n{}\n{started}\n", std::process::id(), cmd.join(" "))?;
        file.flush()?;
        Ok(Self { file })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // A clean exit leaves an empty file: only a crashed holder leaves its pid behind. With
        // shared holders the file is cleared only by the last one out (it gets the lock alone).
        use std::os::unix::io::AsRawFd;
        // SAFETY: as in take.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let _ = self.file.set_len(0);
        }
    }
}

/// The lock file of a run directory (`codespot run` holds it alone, each `tune` shared).
pub fn run_lock_path(out_dir: &Path) -> PathBuf {
    out_dir.join(".codespot.lock")
}

/// The lock file beside a single output directory (`score --out`): a hidden sibling.
pub fn output_lock_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.lock"))
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic inside it into an error (its message included) without printing
/// the panic: for third-party decoders that still panic on some corrupt inputs (arrow-ipc).
/// Panics elsewhere, and on other threads, are reported as usual.
pub(crate) fn catch_decoder_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the decoder panicked".into());
        anyhow::bail!("{what}: corrupt data ({msg})")
    })
}

/// The batches `[lo, hi)` of shard `index` (1-based) of `count` over `batches` batches: contiguous,
/// disjoint, covering all batches, sizes differing by at most one.
pub(crate) fn shard_range(batches: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    (index - 1) * batches / count..index * batches / count
}
