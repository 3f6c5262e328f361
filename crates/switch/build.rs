//! Builds the crate again when a migration is added or changed:
//! `sqlx::migrate!` embeds the files of `migrations/switch` but does not ask
//! cargo to watch the directory, so a new migration was silently left out
//! of a binary built before it.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations/switch");
}
