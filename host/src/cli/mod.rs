//! Subcommands of the `orchestrix` binary other than `serve`, each a thin
//! HTTP client of a running host: `client` (`send`, `events`, `modules`,
//! and the helpers the others share), `history` (`state`, `what-if`),
//! `read_side` (`projections`, `query`), `sagas`, `subscriptions` and
//! `deploy` (a file into the plugins directory, then the host's answer);
//! `new`, which scaffolds a module crate; `dev`, the build → serve →
//! rebuild loop in a module's folder; and
//! `tokens` and `lifecycle` (`store copy|verify|backup`, `export`,
//! `import`), which talk to the store itself; `keys` and `sign`
//! (`signing`), which work on files.

pub mod client;
pub mod deploy;
pub mod dev;
pub mod history;
pub mod lifecycle;
pub mod new;
pub mod read_side;
pub mod sagas;
pub mod signing;
pub mod subscriptions;
pub mod tokens;
