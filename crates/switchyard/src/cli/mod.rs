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
    /// Standard output was closed by its reader (`| head -1`): nothing to
    /// say, and the exit status of a program that wrote into a closed pipe.
    StdoutClosed,
}

/// 128 + SIGPIPE: what the shell shows for any program that writes into a
/// pipe its reader closed (`yes | head -1`).
pub const STDOUT_CLOSED: u8 = 141;

/// A failed write to standard output: its reader closing it is
/// [`Failure::StdoutClosed`], anything else is said.
pub fn writing_stdout(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return Failure::StdoutClosed;
    }
    Failure::Other(anyhow::Error::new(e).context("writing to standard output"))
}

impl Failure {
    /// 2 for malformed input, [`STDOUT_CLOSED`] for a closed standard
    /// output, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Input(_) => 2,
            Failure::Other(_) => 1,
            Failure::StdoutClosed => STDOUT_CLOSED,
        }
    }
}

impl std::fmt::Display for Failure {
    /// The error and its causes, `: ` between them. A cause is not said
    /// twice: sqlx's I/O errors print their source themselves, and a
    /// PostgreSQL error, said by its message and SQLSTATE, has itself for
    /// a source in sqlx's words, "MESSAGE at line N" (the line of
    /// PostgreSQL's C source that raised it, which tells an operator
    /// nothing).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Failure::Input(e) | Failure::Other(e)) = self else {
            return f.write_str("standard output closed");
        };
        let mut said = String::new();
        for cause in e.chain() {
            let text = match cause.downcast_ref::<sqlx::Error>() {
                Some(e) => group_commit::postgres::Said(e).to_string(),
                None => cause.to_string(),
            };
            let bare = text
                .rsplit_once(" at line ")
                .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .map_or(text.as_str(), |(message, _)| message);
            if said.ends_with(&text) || said.contains(&format!("{bare} (SQLSTATE ")) {
                continue;
            }
            if !said.is_empty() {
                said.push_str(": ");
            }
            said.push_str(&text);
        }
        f.write_str(&said)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::Failure;

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e =
            anyhow::Error::new(sqlx::Error::Io(io)).context("connecting to the database at h:1/d");
        assert_eq!(
            Failure::Other(e).to_string(),
            "connecting to the database at h:1/d: error communicating with database: refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(Failure::Other(plain).to_string(), "outer: inner");
    }
}
