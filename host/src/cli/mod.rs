//! Subcommands of the `orchestrix` binary other than `serve`.

pub mod client;
pub mod read_side;
