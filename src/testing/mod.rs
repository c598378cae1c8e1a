//! Harnesses shared by the integration tests and the benchmarks: real services, started
//! privately and cleaned up however the caller ends.

pub mod envd;
pub mod guest;
pub mod kernel;
pub mod pg;
