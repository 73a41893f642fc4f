//! SQL text handling: routing hints in leading comments.

pub mod classify;
pub mod hints;
pub mod walk;
