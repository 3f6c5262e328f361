//! Simulated POS terminals: a terminal that speaks the cup-pos dialect over
//! TCP as a real one does, for the tests and the load generator: the closed
//! loop of `switchyard load`, the open-loop scheduler and the HDR report the
//! scenario runner (issue 5) builds on, its live progress line and its
//! report as a self-contained HTML page.

pub mod closed;
pub mod cpu;
pub mod html;
pub mod live;
pub mod machine;
pub mod open;
pub mod report;
pub mod scenario;
#[cfg(test)]
mod stand_in;
pub mod terminal;

pub use terminal::{Field, Original, Reply, Reversed, Terminal};
