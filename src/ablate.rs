//! Ablation: zero the masked parameters in memory, reversibly.

use crate::source::Weights;
use crate::spot::Mask;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// The values an ablation overwrote, to put back.
#[derive(Debug, Default)]
pub struct Saved {
    values: BTreeMap<String, Vec<(usize, f32)>>,
}

impl Saved {
    pub fn count(&self) -> usize {
        self.values.values().map(|v| v.len()).sum()
    }
}

/// Zero every masked element of `w`; returns what was there.
pub fn zero(w: &mut Weights, masks: &BTreeMap<String, Mask>) -> Result<Saved> {
    for (n, m) in masks {
        let Some(t) = w.tensors.get(n) else {
            bail!("the spot names tensor '{n}', which the model does not have")
        };
        if t.numel() != m.len {
            bail!(
                "the spot's mask for '{n}' has {} elements, the model's tensor {}",
                m.len,
                t.numel()
            );
        }
    }
    let mut saved = Saved::default();
    for (n, m) in masks {
        let t = w.tensors.get_mut(n).expect("checked");
        let v: Vec<(usize, f32)> = m
            .indices()
            .map(|i| (i, std::mem::replace(&mut t.data[i], 0.0)))
            .collect();
        saved.values.insert(n.clone(), v);
    }
    Ok(saved)
}

/// Put back what [`zero`] overwrote: the weights are bit-identical to before.
pub fn restore(w: &mut Weights, saved: Saved) {
    for (n, v) in saved.values {
        if let Some(t) = w.tensors.get_mut(&n) {
            for (i, x) in v {
                t.data[i] = x;
            }
        }
    }
}
