//! Running untrusted generated programs: each in a fresh temp dir, in its own process group,
//! with CPU-time, address-space, file-size and process-count limits, a wall-clock timeout
//! that kills the whole group, no network (a new network namespace where the kernel allows
//! one, and Landlock's TCP rules), as the unprivileged user `nobody` when codespot runs as root,
//! and confined by Landlock to its own directory: it may write only there, and read only the
//! system's program and library directories (`/usr`, `/lib*`, `/bin`, `/etc`, `/opt`, `/proc`,
//! `/sys`, `/dev`) and the toolchain that runs it. Home directories, the project, `/tmp` and
//! every other path are out of reach, whoever runs codespot.
//!
//! Landlock (Linux ≥ 5.13) is required: on a kernel without it no program runs, unless
//! `CODESPOT_ALLOW_UNCONFINED=1` says to go on without filesystem confinement.

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Limits {
    pub wall: Duration,
    pub cpu_s: u64,
    pub mem_bytes: u64,
    pub nproc: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // bigcode-evaluation-harness gives each program 3 s.
        Self {
            wall: Duration::from_secs(3),
            cpu_s: 3,
            mem_bytes: 1 << 30,
            nproc: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(i32),
    TimedOut,
    Signalled(i32),
}

/// The Python interpreter used for programs: `$CODESPOT_PYTHON`, else /usr/bin/python3.
pub fn python() -> String {
    std::env::var("CODESPOT_PYTHON").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".into()
        } else {
            "python3".into()
        }
    })
}

/// One program at a time per process: programs run as `nobody` share its process-count
/// limit, so a fork bomb's leftovers must be gone before the next program starts.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run `program` (Python source) under the limits.
pub fn run_python(program: &str, limits: &Limits) -> Result<Outcome> {
    run_steps(
        &[("program.py", program)],
        &[(vec![python(), "-I".into(), "program.py".into()], limits.clone())],
        None,
    )
}

/// Write `files` into a fresh temp dir and run `steps` there one after another (e.g. compile,
/// then run), each under the limits; the first step that does not pass decides the outcome.
/// With `fail_on_stderr`, output on stderr containing that text is a failure too (node's
/// `console.assert` only prints).
pub(crate) fn run_steps(
    files: &[(&str, &str)],
    steps: &[(Vec<String>, Limits)],
    fail_on_stderr: Option<&str>,
) -> Result<Outcome> {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::Builder::new()
        .prefix("codespot-exec-")
        .tempdir()
        .context("creating a temp dir")?;
    let root = unsafe { libc::geteuid() } == 0;
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text)?;
    }
    if root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        for (name, _) in files {
            std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(0o666))?;
        }
    }
    for (i, (step, limits)) in steps.iter().enumerate() {
        let err_path = dir.path().join(format!(".stderr{i}"));
        let out = run_one(dir.path(), step, limits, &err_path)?;
        if out != Outcome::Passed {
            return Ok(out);
        }
        if let Some(needle) = fail_on_stderr {
            if std::fs::read_to_string(&err_path).unwrap_or_default().contains(needle) {
                return Ok(Outcome::Failed(1));
            }
        }
    }
    Ok(Outcome::Passed)
}

/// Directories every program may read and execute from.
const SYSTEM_DIRS: [&str; 12] = [
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys", "/dev",
];
/// Device files a program may also write.
const WRITABLE_DEVICES: [&str; 2] = ["/dev/null", "/dev/zero"];

/// Whether programs may run without Landlock (`CODESPOT_ALLOW_UNCONFINED=1`).
fn unconfined_allowed() -> bool {
    std::env::var("CODESPOT_ALLOW_UNCONFINED").is_ok_and(|v| v == "1")
}

/// The install prefix of the program `exe` (looked up on `PATH`, links followed): `/x/bin/exe`
/// gives `/x`, so a toolchain outside the system directories (pyenv, a JDK in /srv) can still
/// read its own library.
fn toolchain_prefix(exe: &str, path: &str) -> Option<std::path::PathBuf> {
    let found = if exe.contains('/') {
        std::path::PathBuf::from(exe)
    } else {
        std::env::split_paths(path).map(|d| d.join(exe)).find(|p| p.is_file())?
    };
    let real = std::fs::canonicalize(found).ok()?;
    let bin = real.parent()?;
    Some(bin.parent().unwrap_or(bin).to_path_buf())
}

/// The Landlock ruleset for a program in `dir`: read + execute on the system directories and
/// `extra_read`, everything inside `dir`, no TCP bind or connect, no signals to or abstract
/// sockets of processes outside. Built in the parent (it opens files and allocates); the child
/// only calls `restrict_self` between fork and exec.
fn confinement(dir: &std::path::Path, extra_read: &[std::path::PathBuf]) -> Result<landlock::RulesetCreated> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, Scope, ABI,
    };
    let level = if unconfined_allowed() {
        CompatLevel::BestEffort
    } else {
        CompatLevel::HardRequirement
    };
    let build = || -> std::result::Result<landlock::RulesetCreated, landlock::RulesetError> {
        let read = AccessFs::from_read(ABI::V1);
        Ruleset::default()
            // Filesystem confinement (ABI 1, Linux 5.13) is what this module promises.
            .set_compatibility(level)
            .handle_access(AccessFs::from_all(ABI::V1))?
            // Newer rights where the kernel has them: rename across dirs, truncate, ioctl on
            // devices (ABI 2, 3, 5), TCP (4), scoped signals and abstract sockets (6).
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(ABI::V5))?
            .handle_access(AccessNet::from_all(ABI::V4))?
            .scope(Scope::from_all(ABI::V6))?
            .create()?
            .add_rules(path_beneath_rules(SYSTEM_DIRS, read))?
            .add_rules(path_beneath_rules(extra_read, read))?
            .add_rules(path_beneath_rules(WRITABLE_DEVICES, AccessFs::from_all(ABI::V5)))?
            .add_rules(path_beneath_rules([dir], AccessFs::from_all(ABI::V5)))
    };
    build().map_err(|e| {
        anyhow::anyhow!(
            "confining generated code with Landlock: {e}. This kernel lacks Landlock (Linux ≥ 5.13 with \
             `landlock` in its LSM list); set CODESPOT_ALLOW_UNCONFINED=1 to run programs with rlimits, \
             no network and as `nobody`, but without filesystem confinement"
        )
    })
}

fn run_one(dir: &std::path::Path, step: &[String], limits: &Limits, err_path: &std::path::Path) -> Result<Outcome> {
    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    let mut extra = Vec::new();
    for exe in [step[0].clone(), python()] {
        if let Some(p) = toolchain_prefix(&exe, PATH) {
            if !p.starts_with(dir) && p.parent().is_some() {
                extra.push(p);
            }
        }
    }
    let mut ruleset = Some(confinement(dir, &extra)?);
    let strict = !unconfined_allowed();
    let mut cmd = Command::new(&step[0]);
    cmd.args(&step[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd.stderr(Stdio::from(std::fs::File::create(err_path)?));
    cmd.env_clear()
        .env("PATH", PATH)
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let l = limits.clone();
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let set = |res, v: u64| {
                let r = libc::rlimit {
                    rlim_cur: v as libc::rlim_t,
                    rlim_max: v as libc::rlim_t,
                };
                libc::setrlimit(res, &r);
            };
            set(libc::RLIMIT_CPU, l.cpu_s);
            set(libc::RLIMIT_AS, l.mem_bytes);
            set(libc::RLIMIT_FSIZE, 16 << 20);
            set(libc::RLIMIT_CORE, 0);
            set(libc::RLIMIT_NPROC, l.nproc);
            // No network: a fresh network namespace (root), or a user + network namespace.
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
            }
            if libc::geteuid() == 0 {
                // Drop to nobody so RLIMIT_NPROC applies and the host's files are out of reach.
                libc::setgroups(0, std::ptr::null());
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Last: Landlock (it also sets no_new_privs). A failure stops the exec.
            if let Some(r) = ruleset.take() {
                match r.restrict_self() {
                    Ok(s) if strict && s.ruleset == landlock::RulesetStatus::NotEnforced => {
                        return Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
                    }
                    Ok(_) => {}
                    Err(_) if !strict => {}
                    Err(_) => return Err(std::io::Error::from_raw_os_error(libc::EPERM)),
                }
            }
            Ok(())
        });
    }
    // setuid(nobody) fails with EAGAIN while a previous program's killed processes are
    // still being torn down: retry briefly.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("starting {} (confined: rlimits, no network, Landlock)", step[0]))
            }
        }
    };
    let pid = child.id() as i32;
    let t0 = Instant::now();
    let outcome = loop {
        if let Some(st) = child.try_wait()? {
            use std::os::unix::process::ExitStatusExt;
            break match (st.code(), st.signal()) {
                (Some(0), _) => Outcome::Passed,
                (Some(c), _) => Outcome::Failed(c),
                (None, Some(sig)) => Outcome::Signalled(sig),
                _ => Outcome::Failed(-1),
            };
        }
        if t0.elapsed() > limits.wall {
            break Outcome::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Kill whatever is left of the group (forked children included), then reap.
    unsafe {
        libc::killpg(pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    // Wait (up to 5 s) until the whole group is gone, so its processes no longer count against
    // the next program's process limit.
    let t1 = Instant::now();
    while unsafe { libc::killpg(pid, 0) } == 0 && t1.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(outcome)
}
