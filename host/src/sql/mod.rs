//! SQL text handling: routing hints in leading comments.

pub mod hints;
