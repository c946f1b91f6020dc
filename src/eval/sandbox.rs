//! Running untrusted generated programs: each in a fresh temp dir, in its own process group,
//! with CPU-time, address-space, file-size and process-count limits, a wall-clock timeout
//! that kills the whole group, no network (a new network namespace where the kernel allows
//! one), and, when codespot runs as root, as the unprivileged user `nobody`.

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
pub fn run_steps(
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

fn run_one(dir: &std::path::Path, step: &[String], limits: &Limits, err_path: &std::path::Path) -> Result<Outcome> {
    let mut cmd = Command::new(&step[0]);
    cmd.args(&step[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd.stderr(Stdio::from(std::fs::File::create(err_path)?));
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
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
            Err(e) => return Err(e).with_context(|| format!("starting {}", step[0])),
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
