//! Process-wide `tracing` set-up: the level comes from `RUST_LOG` when set, else from the
//! configuration; output is human text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter `{filter}`: {reason}")]
pub struct LogFilterError {
    filter: String,
    reason: String,
}

pub fn init(config: &LogConfig) -> Result<(), LogFilterError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| config.level.clone());
    let filter = EnvFilter::try_new(&filter_text)
        .map_err(|e| LogFilterError { filter: filter_text.clone(), reason: e.to_string() })?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests calling into the CLI) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}
