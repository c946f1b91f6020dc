//! codespot: find and follow the Coding Spot of a large language model.
//!
//! Modules in pipeline order: [`source`] → [`model`] → … (data, train, importance, spot,
//! ablate, eval, track follow).

pub mod alloc;
pub mod backend;
pub mod source;
pub mod model;
pub mod util;
pub mod cli;
