//! One module per subcommand of `lb`.

pub mod bench;
pub mod demo;
pub mod list;
pub mod replay;
pub mod run;

/// What a subcommand returns on failure: a message for the user.
pub type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
