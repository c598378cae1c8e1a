//! The host agent: registers with the control plane and runs this host's microVMs.

pub mod registration;
