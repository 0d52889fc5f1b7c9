//! The wasm artifacts `build.rs` built from `plugins/*` and
//! `tests/fixtures/*` — one constant per artifact, its absolute path
//! (`BANK`, `FIXTURE_COUNTER_V2`, …), so a misspelt fixture does not
//! compile — and the compile-time check that every artifact has a test.
//!
//! A test module names the test that exercises an artifact with
//! [`fixture_tests!`]; [`tested`] gathers those declarations, and
//! `foreach_fixture!(assert_tested)` requires one for every artifact. A new
//! fixture (or a new feature of one) without a test fails to compile:
//! ``cannot find value `FIXTURE_NEW` in module `tested` ``.

include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));

/// The bytes of an artifact.
pub fn read(artifact: &str) -> Vec<u8> {
    std::fs::read(artifact).unwrap_or_else(|error| panic!("{artifact} (built by tests/build.rs): {error}"))
}

/// Declares which test of the calling module exercises each artifact:
/// `fixture_tests! { FIXTURE_HAZARD => a_trap_fails_one_call }` defines
/// `tested::FIXTURE_HAZARD` there, naming that test (so it must exist).
/// Each artifact is declared by one module.
macro_rules! fixture_tests {
    ($($artifact:ident => $test:ident),+ $(,)?) => {
        /// The test of this module that exercises each of these artifacts
        /// (checked in `crate::fixtures`).
        pub(crate) mod tested {
            $(pub(crate) const $artifact: fn() = super::$test;)+
        }
    };
}
pub(crate) use fixture_tests;

/// Every module's [`fixture_tests!`] declarations. A module that declares
/// artifacts is listed here; an artifact declared by two modules is an
/// ambiguity error.
mod tested {
    pub(crate) use crate::bank_rules::tested::*;
    pub(crate) use crate::history::tested::*;
    pub(crate) use crate::lifecycle::tested::*;
    pub(crate) use crate::plugins_dir::tested::*;
    pub(crate) use crate::projections::tested::*;
    pub(crate) use crate::saga_domains::tested::*;
    pub(crate) use crate::sandbox_limits::tested::*;
}

/// Fails to compile unless a test module declared a test of `$artifact`.
macro_rules! assert_tested {
    ($artifact:ident) => {
        // An error here: an artifact has no test. Declare one: `fixture_tests! { ARTIFACT => its_test }`.
        const _: fn() = tested::$artifact;
    };
}

foreach_fixture!(assert_tested);
