//! `switchyard`: the one binary of the Switchyard acquirer switch.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Switchyard acquirer switch")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode one ISO 8583 frame and print it as JSON.
    Decode(cli::wire::DecodeArgs),
    /// Read a message as JSON on stdin and print its wire frame as hex.
    Encode(cli::wire::EncodeArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Decode(a) => cli::wire::decode(&a),
        Command::Encode(a) => cli::wire::encode(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
