//! The tuning loop before burn-train drove it, kept as the reference the learner is tested
//! against (`tests/tune.rs`): the same data cursor, step, clipping, schedule and AdamW, in a
//! plain loop with no checkpoints, held-out evaluation or snapshots. burn-train's strategy must
//! give the same losses and weights bit for bit.

use super::adamw::{AdamW, AdamWConfig};
use super::{lr_at, train_data};
use crate::model::{self, Llama};
use crate::recipe::Loaded;
use anyhow::Result;
use burn::tensor::backend::Backend;

/// Each step's (loss, gradient norm), and the final weights (name → f32 values).
pub struct Reference {
    pub steps: Vec<(f64, f64)>,
    pub weights: crate::source::weights::Weights,
}

/// Tune `lang` for `train.steps` steps from the base model, on one device.
pub fn run<B: Backend>(
    loaded: &Loaded,
    corpora: &crate::data::Corpora,
    lang: &str,
    device: &B::Device,
) -> Result<Reference> {
    let r = &loaded.recipe;
    let t = &r.train;
    let mut ck = model::load(&r.model)?;
    let eos = ck.tokenizer.stop_ids(&ck.config.eos_token_ids).first().copied();
    let mut data = train_data(loaded, corpora, &ck, lang, eos)?;
    let w = std::mem::take(&mut ck.weights);
    let mut model = Llama::<crate::backend::Ad<B>>::from_weights_owned(&ck.config, w, device, r.dtype)?;
    model.keep_blocks = t.keep_blocks;
    model.set_autocast(r.autocast)?;
    let mut opt = AdamW::new(AdamWConfig::from(t), &model);
    let devices = vec![device.clone()];
    let mut pos = 0;
    let mut steps = vec![];
    for step in 1..=t.steps {
        let batches: Vec<Vec<Vec<u32>>> = (0..t.grad_accum).map(|_| data.rows(&mut pos, t.batch).0).collect();
        let (loss, grads) = super::learner::accumulate(&model, &batches, t.micro_batch, &devices)?;
        let avg = 1.0 / t.grad_accum as f64;
        let norm = AdamW::grad_norm(&grads) * avg;
        let clip = if t.grad_clip > 0.0 && norm > t.grad_clip {
            t.grad_clip / norm
        } else {
            1.0
        };
        model = opt.step(model, grads, lr_at(t, step), avg * clip);
        steps.push((loss, norm));
    }
    Ok(Reference {
        steps,
        weights: model.to_weights(),
    })
}
