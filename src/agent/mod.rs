//! The host agent: everything that runs on a KVM host beside the microVMs.

pub mod disk;
pub mod network;
