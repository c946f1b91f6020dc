//! What burn-train shows and logs while codespot tunes: its metrics (codespot's scalars as
//! burn-train numeric metrics beside its own learning rate, CPU and memory metrics) and a
//! plain-line renderer for when stdout is not a terminal (burn-train's own CLI renderer prints
//! `Debug` structs to stdout, one per step).

use super::StepLog;
use burn_train::metric::state::{FormatOptions, NumericMetricState};
use burn_train::metric::{
    Adaptor, Metric, MetricAttributes, MetricDefinition, MetricId, MetricMetadata, MetricName, Numeric,
    NumericAttributes, NumericEntry, SerializedEntry,
};
use burn_train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The named numbers one item (a training step, or one held-out set) reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scalars(pub Vec<(&'static str, f64)>);

/// A training step as burn-train's event processor sees it.
#[derive(Debug, Clone)]
pub struct Stepped {
    pub log: StepLog,
    /// Counted targets of the step (tokens whose prediction is in the loss).
    pub tokens: usize,
    /// Why the step could not be computed (the step is not applied).
    pub error: Option<String>,
}

impl burn_train::ItemLazy for Stepped {
    type ItemSync = Self;
    fn sync(self) -> Self {
        self
    }
}

impl Adaptor<Scalars> for Stepped {
    fn adapt(&self) -> Scalars {
        let l = &self.log;
        Scalars(vec![
            ("loss", l.loss),
            ("perplexity", l.loss.exp()),
            ("grad norm", l.grad_norm),
            ("tokens/s", l.tokens_per_s),
        ])
    }
}

/// One held-out set's loss as burn-train's validation events carry it.
#[derive(Debug, Clone)]
pub struct HeldoutOut {
    pub lang: String,
    /// Held-out pairs (their response tokens) rather than raw held-out code.
    pub pairs: bool,
    /// Mean loss per counted token (nats).
    pub loss: f64,
    /// Each pair's (Σ nll, counted tokens); empty for raw code.
    pub items: Vec<(f64, f64)>,
}

impl burn_train::ItemLazy for HeldoutOut {
    type ItemSync = Self;
    fn sync(self) -> Self {
        self
    }
}

impl Adaptor<Scalars> for HeldoutOut {
    fn adapt(&self) -> Scalars {
        Scalars(vec![(if self.pairs { "pair loss" } else { "loss" }, self.loss)])
    }
}

/// One of [`Scalars`]' numbers as a burn-train numeric metric (averaged over the epoch's items
/// that report it).
#[derive(Clone)]
pub(crate) struct Scalar {
    key: &'static str,
    name: MetricName,
    unit: Option<&'static str>,
    higher_is_better: bool,
    state: NumericMetricState,
}

impl Scalar {
    pub fn new(key: &'static str, name: &str, unit: Option<&'static str>, higher_is_better: bool) -> Self {
        Scalar {
            key,
            name: Arc::new(name.to_string()),
            unit,
            higher_is_better,
            state: NumericMetricState::new(),
        }
    }

    /// The metrics of a training step.
    pub fn train() -> Vec<Scalar> {
        vec![
            Scalar::new("loss", "Loss", None, false),
            Scalar::new("perplexity", "Perplexity", None, false),
            Scalar::new("grad norm", "Gradient norm", None, false),
            Scalar::new("tokens/s", "Tokens per second", Some("tok/s"), true),
        ]
    }

    /// The metrics of held-out evaluation: raw code, and pairs when there are any.
    pub fn valid(pairs: bool) -> Vec<Scalar> {
        let mut v = vec![Scalar::new("loss", "Held-out loss", None, false)];
        if pairs {
            v.push(Scalar::new("pair loss", "Held-out pair loss", None, false));
        }
        v
    }
}

impl Metric for Scalar {
    type Input = Scalars;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: self.unit.map(str::to_string),
            higher_is_better: self.higher_is_better,
        }
        .into()
    }

    fn update(&mut self, item: &Scalars, _: &MetricMetadata) -> SerializedEntry {
        let mut format = FormatOptions::new(self.name.clone()).precision(4);
        if let Some(u) = self.unit {
            format = format.unit(u);
        }
        match item.0.iter().find(|(k, _)| *k == self.key) {
            Some((_, v)) => self.state.update(*v, 1, format),
            // Not reported by this item (a raw held-out set has no pair loss): no count.
            None => {
                let v = self.state.running_value();
                SerializedEntry::new(String::new(), v.serialize())
            }
        }
    }

    fn clear(&mut self) {
        self.state.reset();
    }
}

impl Numeric for Scalar {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// Plain lines on standard error, one per training step and one per held-out epoch, with every
/// metric's value: what `tune` shows when stdout is not a terminal.
pub(crate) struct LineRenderer {
    label: String,
    names: BTreeMap<Arc<String>, String>,
    train: BTreeMap<String, String>,
    valid: BTreeMap<String, String>,
    quiet: bool,
}

impl LineRenderer {
    /// `quiet`: print nothing (tests, `--quiet`).
    pub fn new(label: &str, quiet: bool) -> Self {
        LineRenderer {
            label: label.into(),
            names: BTreeMap::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            quiet,
        }
    }

    /// A metric's name and its value as the line shows it; `None` while nothing is reported.
    fn entry(&self, state: MetricState) -> Option<(String, String)> {
        let (entry, value) = match state {
            MetricState::Generic(e) => (e, None),
            MetricState::Numeric(e, v) => (e, Some(v)),
        };
        let name = self.name_of(&entry.metric_id);
        let text = match value.map(|v| v.current()) {
            // Nothing reported yet (a raw held-out set has no pair loss).
            Some(v) if v.is_nan() => return None,
            Some(v) if v != 0.0 && v.abs() < 1e-3 => format!("{v:.3e}"),
            Some(v) => format!("{v:.4}"),
            None => entry.serialized_entry.formatted,
        };
        Some((name, text))
    }

    fn name_of(&self, id: &MetricId) -> String {
        // MetricId keeps its string private; its Debug form names it.
        let key = Arc::new(format!("{id:?}"));
        self.names.get(&key).cloned().unwrap_or_else(|| format!("{id:?}"))
    }

    fn line(&self, what: &str, item: &TrainingProgress, values: &BTreeMap<String, String>) {
        if self.quiet {
            return;
        }
        let at = match (&item.progress, item.iteration) {
            (Some(p), _) => format!("{}/{}", p.items_processed, p.items_total),
            (None, Some(i)) => i.to_string(),
            _ => String::new(),
        };
        let vals: Vec<String> = values.iter().map(|(k, v)| format!("{k} {v}")).collect();
        eprintln!(
            "{} {what} epoch {}/{} item {at}: {}",
            self.label,
            item.global_progress.items_processed,
            item.global_progress.items_total,
            vals.join(", ")
        );
    }
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.train.extend(self.entry(state));
    }

    fn update_valid(&mut self, state: MetricState) {
        self.valid.extend(self.entry(state));
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        self.line("train", &item, &self.train);
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        self.line("held-out", &item, &self.valid);
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(Arc::new(format!("{:?}", definition.metric_id)), definition.name);
    }
}
