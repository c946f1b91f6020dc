//! Benchmarks of the hot paths on synthetic tokens: a forward pass, greedy generation, an
//! importance (Taylor) pass, and a tuning step (the tune loop's own gradient and AdamW code). Each returns what it
//! measured; `codespot bench …` prints it, `scripts/bench-vs-torch.sh` compares it with PyTorch.

use crate::model::{self, Autocast, Checkpoint, Dtype, Llama};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::Serialize;

/// The shape of a training-like benchmark (`bench score`, `bench tune`).
#[derive(Debug, Clone)]
pub struct StepShape {
    pub model: String,
    pub batch: usize,
    pub micro_batch: usize,
    /// Top blocks whose activations the backward pass keeps instead of recomputing them.
    pub keep_blocks: usize,
    pub seq_len: usize,
    /// Timed batches (after one warm-up batch).
    pub steps: usize,
    pub dtype: Dtype,
    pub autocast: Autocast,
}

/// A benchmark's checkpoint, its model under autodiff, and its synthetic rows.
type BenchModel<B> = (Checkpoint, Llama<crate::backend::Ad<B>>, Vec<Vec<u32>>);

impl StepShape {
    /// Check the sizes, load the model with the shape's dtype and kept blocks, and make
    /// `steps + 1` batches of synthetic rows (the first for warm-up).
    fn load<B: Backend>(&self, what: &str, device: &B::Device) -> Result<BenchModel<B>> {
        anyhow::ensure!(
            self.batch > 0 && self.micro_batch > 0 && self.steps > 0 && self.seq_len > 0,
            "bench {what}: batch, micro-batch, seq-len and steps must be positive"
        );
        let mut ck = model::load(&self.model)?;
        let w = std::mem::take(&mut ck.weights);
        let mut m = Llama::<crate::backend::Ad<B>>::from_weights_owned(&ck.config, w, device, self.dtype)?;
        m.keep_blocks = self.keep_blocks;
        m.set_autocast(self.autocast)?;
        let rows = self.batch * (self.steps + 1);
        let blocks = model::llama::synthetic_tokens(ck.config.vocab_size, rows, self.seq_len + 1);
        Ok((ck, m, blocks))
    }
}

fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// `bench forward`: tokens/s of a forward pass.
#[derive(Debug, Clone, Serialize)]
pub struct Forward {
    pub tokens_per_s: f64,
    pub median_s: f64,
    pub batch: usize,
    pub seq_len: usize,
    pub runs: usize,
    /// How the products ran (the hand-written block in f32, bf16 on a unit, or burn's ops).
    pub path: String,
    pub peak_rss_bytes: u64,
}

/// The median of `runs` forward passes (after one warm-up pass) of `batch × seq_len` tokens.
pub fn forward<B: Backend>(
    source: &str,
    batch: usize,
    seq_len: usize,
    runs: usize,
    autocast: Autocast,
    device: &B::Device,
) -> Result<Forward> {
    anyhow::ensure!(
        batch > 0 && seq_len > 0 && runs > 0,
        "bench forward: batch, seq-len and runs must be positive"
    );
    let ck = model::load(source)?;
    let mut m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
    m.set_autocast(autocast)?;
    let rows = model::llama::synthetic_tokens(ck.config.vocab_size, batch, seq_len);
    let mut times = Vec::new();
    for r in 0..runs + 1 {
        let t0 = std::time::Instant::now();
        let logits = m.forward(model::tokens_tensor::<B>(&rows, device), None);
        let _ = logits.sum().into_data();
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let med = median(&times);
    Ok(Forward {
        tokens_per_s: (batch * seq_len) as f64 / med,
        median_s: med,
        batch,
        seq_len,
        runs,
        path: if m.uses_fused_forward() {
            m.products()
        } else {
            "burn ops".into()
        },
        peak_rss_bytes: crate::util::peak_rss_bytes().unwrap_or(0),
    })
}

/// `bench generate`: greedy decoding speed.
#[derive(Debug, Clone, Serialize)]
pub struct Generate {
    /// New tokens per second over the whole run (prefill included).
    pub tokens_per_s: f64,
    pub new_tokens: usize,
    pub seconds: f64,
    pub prompts: usize,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch: usize,
    pub peak_rss_bytes: u64,
}

/// Greedy decoding of `prompts` synthetic prompts of `prompt_len` tokens, `max_new` new tokens
/// each (fewer where one draws an end-of-sequence token), `batch` at a time.
pub fn generate<B: Backend>(
    source: &str,
    prompts: usize,
    prompt_len: usize,
    max_new: usize,
    batch: usize,
    device: &B::Device,
) -> Result<Generate> {
    anyhow::ensure!(
        prompts > 0 && prompt_len > 0 && max_new > 0 && batch > 0,
        "bench generate: prompts, prompt-len, new-tokens and batch must be positive"
    );
    let ck = model::load(source)?;
    let m = Llama::<B>::from_weights(&ck.config, &ck.weights, device)?;
    let opts = model::generate::GenOptions {
        max_tokens: max_new,
        ..Default::default()
    };
    let reqs: Vec<model::generate::GenRequest> =
        model::llama::synthetic_tokens(ck.config.vocab_size, prompts, prompt_len)
            .into_iter()
            .map(|prompt| model::generate::GenRequest {
                prompt,
                opts: opts.clone(),
            })
            .collect();
    let t0 = std::time::Instant::now();
    let outs = model::generate::generate_many(&m, &ck.tokenizer, &reqs, batch, |_| {})?;
    let seconds = t0.elapsed().as_secs_f64();
    let new_tokens = outs.iter().map(|o| o.ids.len()).sum::<usize>();
    Ok(Generate {
        tokens_per_s: new_tokens as f64 / seconds,
        new_tokens,
        seconds,
        prompts,
        prompt_len,
        max_new_tokens: max_new,
        batch,
        peak_rss_bytes: crate::util::peak_rss_bytes().unwrap_or(0),
    })
}

/// `bench tune`: tokens/s of a tuning step.
#[derive(Debug, Clone, Serialize)]
pub struct Tune {
    pub median_tokens_per_s: f64,
    /// Per timed step, sorted.
    pub step_tokens_per_s: Vec<f64>,
    pub batch: usize,
    pub micro_batch: usize,
    pub keep_blocks: usize,
    /// Which backward pass ran: the fused f32 CPU block, or burn autodiff.
    pub path: String,
    pub seq_len: usize,
    pub steps: usize,
    pub dtype: &'static str,
    pub peak_rss_bytes: u64,
}

/// The backward pass a model takes, in words.
fn path<B: AutodiffBackend>(m: &Llama<B>) -> String {
    if m.uses_fused() {
        m.products()
    } else {
        format!("burn autodiff, {} blocks kept", m.keep_blocks)
    }
}

/// AdamW steps on synthetic tokens through the tune loop's own gradient and update code.
pub fn tune<B: Backend>(shape: &StepShape, device: &B::Device) -> Result<Tune> {
    use crate::train::adamw::{AdamW, AdamWConfig};
    let (_, mut m, blocks) = shape.load::<B>("tune", device)?;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::<B>::new(cfg, &m);
    let mut rates = vec![];
    for (i, rows) in blocks.chunks(shape.batch).enumerate() {
        let t0 = std::time::Instant::now();
        let (_, grads) = crate::engine::batch_loss_grads(&m, rows, shape.micro_batch, true);
        m = opt.step(m, grads, 1e-5, 1.0);
        let _ = m.embed.val().inner().slice([0..1, 0..1]).into_data(); // wait for the update
        if i > 0 {
            rates.push((shape.batch * shape.seq_len) as f64 / t0.elapsed().as_secs_f64());
            // the first is warm-up
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(Tune {
        median_tokens_per_s: median(&rates),
        step_tokens_per_s: rates,
        batch: shape.batch,
        micro_batch: shape.micro_batch,
        keep_blocks: shape.keep_blocks,
        path: path(&m),
        seq_len: shape.seq_len,
        steps: shape.steps,
        dtype: shape.dtype.name(),
        peak_rss_bytes: crate::util::peak_rss_bytes().unwrap_or(0),
    })
}

/// `bench score`: tokens/s of an importance (Taylor) pass, beside the machine's sgemm rate.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub tokens_per_s: f64,
    pub median_batch_tokens_per_s: f64,
    /// Per timed batch, sorted.
    pub batch_tokens_per_s: Vec<f64>,
    /// The machine's f32 matmul rate, measured before and after (averaged).
    pub sgemm_gflop_per_s: f64,
    /// Tokens/s that half the sgemm rate allows at 6·N flops per token.
    pub half_sgemm_tokens_per_s: f64,
    pub seconds: f64,
    pub batch: usize,
    pub micro_batch: usize,
    pub keep_blocks: usize,
    /// Which backward pass ran: the fused f32 CPU block, or burn autodiff.
    pub path: String,
    pub seq_len: usize,
    pub steps: usize,
    pub peak_rss_bytes: u64,
    /// At 6·N flops per token and the median batch rate.
    pub gflop_per_s: f64,
}

pub fn score<B: Backend>(shape: &StepShape, device: &B::Device) -> Result<Score> {
    use crate::importance::Method;
    let (ck, m, blocks) = shape.load::<B>("score", device)?;
    let (batch, seq_len) = (shape.batch, shape.seq_len);
    // The first batch warms up; the rest are timed.
    let (warm, timed) = blocks.split_at(batch);
    crate::importance::score(&m, warm, batch, shape.micro_batch, Method::Taylor, |_| {})?;
    // The machine's sgemm rate, measured before and after (a shared machine's speed drifts).
    let sgemm_before = crate::backend::sgemm_gflops::<B>(device);
    let t0 = std::time::Instant::now();
    let mut marks = vec![];
    crate::importance::score(&m, timed, batch, shape.micro_batch, Method::Taylor, |_| {
        marks.push(t0.elapsed().as_secs_f64())
    })?;
    let dt = t0.elapsed().as_secs_f64();
    // Per-batch rates, and their median: robust to a passing slowdown of a shared machine.
    let mut rates: Vec<f64> = std::iter::once(0.0)
        .chain(marks.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (batch * seq_len) as f64 / (w[1] - w[0]))
        .collect();
    rates.sort_by(f64::total_cmp);
    let med = median(&rates);
    let sgemm = (sgemm_before + crate::backend::sgemm_gflops::<B>(device)) / 2.0;
    let n = ck.config.num_params() as f64;
    Ok(Score {
        tokens_per_s: (shape.steps * batch * seq_len) as f64 / dt,
        median_batch_tokens_per_s: med,
        batch_tokens_per_s: rates,
        sgemm_gflop_per_s: sgemm,
        half_sgemm_tokens_per_s: sgemm * 1e9 / (2.0 * 6.0 * n),
        seconds: dt,
        batch,
        micro_batch: shape.micro_batch,
        keep_blocks: shape.keep_blocks,
        path: path(&m),
        seq_len,
        steps: shape.steps,
        peak_rss_bytes: crate::util::peak_rss_bytes().unwrap_or(0),
        gflop_per_s: 6.0 * n * med / 1e9,
    })
}
