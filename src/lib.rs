//! codespot: find and follow the Coding Spot of a large language model.
//!
//! Modules in pipeline order: [`source`] → [`model`] → [`data`] → [`train`] → [`importance`] →
//! [`spot`] → [`ablate`] → [`eval`] → [`track`] → [`report`]; [`recipe`] describes a whole
//! study and [`study`] runs it.

pub mod ablate;
pub mod alloc;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod collective;
pub mod data;
pub mod engine;
pub mod eval;
pub mod importance;
pub mod layout;
pub mod model;
pub mod pairs;
pub mod plan;
pub mod plot;
pub mod recipe;
pub mod report;
pub mod source;
pub mod spot;
pub mod study;
pub mod topk;
pub mod track;
pub mod train;
pub mod util;
