//! codespot: find and follow the Coding Spot of a large language model.
//!
//! Modules in pipeline order: [`source`] → [`model`] → [`data`] → [`train`] → [`importance`] →
//! [`spot`] → [`ablate`] → [`eval`] → [`track`]; [`recipe`] describes a whole study.

pub mod ablate;
pub mod alloc;
pub mod backend;
pub mod cli;
pub mod data;
pub mod eval;
pub mod importance;
pub mod model;
pub mod recipe;
pub mod source;
pub mod spot;
pub mod track;
pub mod train;
pub mod util;
