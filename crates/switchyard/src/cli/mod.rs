//! The commands of the binary; each module is one command family.

pub mod admin;
pub mod db;
pub mod demo;
pub mod issuer;
pub mod load;
pub mod ops;
pub mod reconcile;
pub mod serve;
pub mod wire;

/// A command failure, with the exit status it warrants.
#[derive(Debug)]
pub enum Failure {
    /// The input (a frame, a JSON message) is malformed: exit status 2.
    Input(anyhow::Error),
    /// Anything else (unreadable file, bad config): exit status 1.
    Other(anyhow::Error),
}

impl Failure {
    /// 2 for malformed input, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Input(_) => 2,
            Failure::Other(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Input(e) | Failure::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}
