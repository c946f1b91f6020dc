//! A TensorBoard event writer: tensorboard-rs 0.5.9 behind a wrapper that turns its panics into
//! errors.
//!
//! What tensorboard-rs does and does not do (read from its source): scalars, raw histograms
//! (`add_histogram_raw`) and RGB images work; `add_histogram` and `add_text` are
//! `unimplemented!()`; IO errors `expect()`/`panic!` on its writer thread, which the next call
//! then sees as a panic on ours; and `add_image` builds the picture with width and height
//! swapped, so only square images come out right. Hence: every call runs under
//! `catch_unwind`, images must be square, and after a failure the writer is closed and each
//! later call reports the first error.
//!
//! Its `SummaryWriter` cannot write a session-start event, which is how TensorBoard learns that
//! a run was resumed (it then drops the events a killed process wrote after its last
//! checkpoint, as PyTorch's `SummaryWriter(purge_step=…)` does); so this wraps its lower
//! `FileWriter` and builds summaries with its `summary` functions.

use anyhow::{bail, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

pub(crate) struct Tb {
    dir: PathBuf,
    inner: Option<tensorboard_rs::summary_writer::FileWriter>,
    failed: Option<String>,
}

/// A histogram in TensorBoard's form: bucket right edges and counts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub limits: Vec<f64>,
    pub counts: Vec<f64>,
}

impl Histogram {
    /// `buckets` equal buckets over `[lo, hi]` (values outside are clamped into the end ones).
    pub fn new(values: impl Iterator<Item = f64>, lo: f64, hi: f64, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let width = (hi - lo) / buckets as f64;
        let mut h = Histogram {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            num: 0.0,
            sum: 0.0,
            sum_squares: 0.0,
            limits: (1..=buckets).map(|i| lo + width * i as f64).collect(),
            counts: vec![0.0; buckets],
        };
        for v in values {
            let b = (((v - lo) / width).floor().max(0.0) as usize).min(buckets - 1);
            h.counts[b] += 1.0;
            h.min = h.min.min(v);
            h.max = h.max.max(v);
            h.num += 1.0;
            h.sum += v;
            h.sum_squares += v * v;
        }
        if h.num == 0.0 {
            h.min = 0.0;
            h.max = 0.0;
        }
        h
    }
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "tensorboard-rs panicked".into())
}

/// tensorboard-rs names its file `events.out.tfevents.<unix seconds>.<host>.<pid>.0` and
/// truncates an existing one, and TensorBoard reads a dir's files in name order. So a new file
/// must not share its second with an existing one (a second writer of the same process would
/// erase it; another process's file might sort after it although written before): wait for
/// the next second in that case.
fn avoid_name_clash(dir: &Path) {
    for _ in 0..20 {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prefix = format!("events.out.tfevents.{secs:010}.");
        let clash = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
        if !clash {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Tb {
    /// Open a writer on `dir` (created). A new event file is started each time, as
    /// TensorBoard expects of a resumed run.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create TensorBoard dir: {e}", dir.display()))?;
        let probe = dir.join(".codespot-write-test");
        std::fs::write(&probe, b"")
            .map_err(|e| anyhow::anyhow!("{}: TensorBoard dir is not writable: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        avoid_name_clash(dir);
        let d = dir.to_path_buf();
        let inner = catch_unwind(move || tensorboard_rs::summary_writer::FileWriter::new(d))
            .map_err(|e| anyhow::anyhow!("{}: opening TensorBoard writer: {}", dir.display(), panic_text(e)))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            inner: Some(inner),
            failed: None,
        })
    }

    fn call(&mut self, what: &str, f: impl FnOnce(&mut tensorboard_rs::summary_writer::FileWriter)) -> Result<()> {
        if let Some(e) = &self.failed {
            bail!("{}: TensorBoard writer failed earlier: {e}", self.dir.display());
        }
        let Some(w) = self.inner.as_mut() else {
            bail!("{}: TensorBoard writer is closed", self.dir.display());
        };
        match catch_unwind(AssertUnwindSafe(|| f(w))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = format!("{what}: {}", panic_text(e));
                self.failed = Some(msg.clone());
                // The writer thread is gone; dropping it would panic again on join.
                std::mem::forget(self.inner.take());
                bail!("{}: writing TensorBoard events: {msg}", self.dir.display())
            }
        }
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) -> Result<()> {
        self.call(tag, |w| {
            w.add_summary(tensorboard_rs::summary::scalar(tag, value as f32), step)
        })
    }

    /// Mark a (re)start at `step`: TensorBoard then discards every event of this dir with a
    /// step ≥ `step` written before (by a process killed after its last checkpoint), so a
    /// resumed run shows each step once. The caller re-logs what belongs to `step` itself.
    pub(crate) fn restart(&mut self, step: usize) -> Result<()> {
        use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
        let mut log = SessionLog::new();
        log.set_status(SessionLog_SessionStatus::START);
        let mut e = Event::new();
        e.set_session_log(log);
        self.call("session start", |w| w.add_event(&e, step))
    }

    pub fn histogram(&mut self, tag: &str, h: &Histogram, step: usize) -> Result<()> {
        if h.limits.len() != h.counts.len() {
            bail!(
                "histogram '{tag}': {} limits for {} counts",
                h.limits.len(),
                h.counts.len()
            );
        }
        self.call(tag, |w| {
            let s = tensorboard_rs::summary::histogram_raw(
                tag,
                h.min,
                h.max,
                h.num,
                h.sum,
                h.sum_squares,
                &h.limits,
                &h.counts,
            );
            w.add_summary(s, step)
        })
    }

    /// A square RGB image, `size × size`, row-major interleaved RGB bytes.
    pub(crate) fn image(&mut self, tag: &str, rgb: &[u8], size: usize, step: usize) -> Result<()> {
        if rgb.len() != size * size * 3 {
            bail!("image '{tag}': {} bytes for a {size}×{size} RGB image", rgb.len());
        }
        self.call(tag, |w| {
            w.add_summary(tensorboard_rs::summary::image(tag, rgb, &[3, size, size]), step)
        })
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        self.call("flush", |w| w.flush())
    }

    /// Flush and close (joins the writer thread, so every event is on disk).
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        let w = self.inner.take();
        catch_unwind(AssertUnwindSafe(move || drop(w)))
            .map_err(|e| anyhow::anyhow!("{}: closing TensorBoard writer: {}", self.dir.display(), panic_text(e)))
    }
}

impl Drop for Tb {
    fn drop(&mut self) {
        if let Some(w) = self.inner.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(w)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_moments() {
        let h = Histogram::new([0.0, 0.5, 1.0, 2.0, -5.0].into_iter(), 0.0, 2.0, 4);
        assert_eq!(h.limits, vec![0.5, 1.0, 1.5, 2.0]);
        // -5 and 0 clamp into the first bucket, 2.0 into the last.
        assert_eq!(h.counts, vec![2.0, 1.0, 1.0, 1.0]);
        assert_eq!((h.min, h.max, h.num, h.sum), (-5.0, 2.0, 5.0, -1.5));
        assert_eq!(h.sum_squares, 0.25 + 1.0 + 4.0 + 25.0);
    }

    #[test]
    fn unwritable_dir_is_an_error_not_a_panic() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = Tb::open(&f.path().join("tb")).err().expect("a file is not a dir");
        assert!(e.to_string().contains("cannot create TensorBoard dir"), "{e}");
    }
}
