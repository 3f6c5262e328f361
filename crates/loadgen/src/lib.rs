//! Simulated POS terminals: a terminal that speaks the cup-pos dialect over
//! TCP as a real one does, for the tests and the load generator.

pub mod closed;
pub mod terminal;

pub use terminal::{Field, Original, Reply, Reversed, Terminal};
