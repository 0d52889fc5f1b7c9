//! Subcommands of the `orchestrix` binary other than `serve`.

pub mod bench;
pub mod bench_feed;
pub mod bench_lifecycle;
pub mod bench_projections;
pub mod bench_robustness;
pub mod client;
pub mod read_side;
