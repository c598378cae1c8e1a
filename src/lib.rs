//! Wrenn: a self-hostable microVM sandbox platform. One binary carries the control plane
//! (`cp`), the host agent (`agent`), the guest agent (`envd`) and the database migrations.

pub mod agent;
pub mod cli;
pub mod config;
pub mod cp;
pub mod db;
pub mod egress;
pub mod envd;
pub mod error_code;
pub mod forward;
pub mod id;
pub mod logging;
pub mod progress;
pub mod prometheus;
pub mod request_id;
pub mod secret;
pub mod sparse;
pub mod store;
pub mod template;
pub mod tls;
pub mod version;
pub mod vmm;
