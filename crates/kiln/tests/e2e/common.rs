//! The tests' support, shared with the benches: kiln-harness's `testing`.

pub use kiln_harness::testing::*;
