//! A template's runtime settings, baked into its image as `/etc/wrenn/template.json`: the
//! environment, user and working directory every process of the sandbox starts with, and the
//! processes started at boot (a template's `START`, such as a Jupyter server). envd reads it once
//! at start, before it serves; the agent's `/init` adds to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::api::StartRequest;
use super::process::Defaults;

/// Where images carry their settings.
pub const TEMPLATE_CONFIG: &str = "/etc/wrenn/template.json";

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Started in the background at boot, each under its tag (`start-<n>` when it has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start: Vec<StartRequest>,
}

impl std::fmt::Debug for TemplateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateConfig")
            .field("env", &crate::secret::EnvNames(&self.env))
            .field("user", &self.user)
            .field("workdir", &self.workdir)
            .field("start", &self.start.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TemplateConfigError {
    path: PathBuf,
    reason: String,
}

impl TemplateConfig {
    /// The settings at `path`; none when the image has no such file.
    pub fn load(path: &Path) -> Result<Option<Self>, TemplateConfigError> {
        let error = |reason: String| TemplateConfigError {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| error(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(error(e.to_string())),
        }
    }

    pub fn defaults(&self) -> Defaults {
        Defaults {
            env: self.env.clone(),
            user: self.user.clone(),
            workdir: self.workdir.clone(),
        }
    }

    /// The processes to start, each with a tag.
    pub fn start_requests(&self) -> Vec<StartRequest> {
        self.start
            .iter()
            .enumerate()
            .map(|(index, request)| StartRequest {
                tag: Some(
                    request
                        .tag
                        .clone()
                        .unwrap_or_else(|| format!("start-{index}")),
                ),
                ..request.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_no_settings_and_a_bad_one_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.json");
        assert_eq!(TemplateConfig::load(&path).unwrap(), None);
        std::fs::write(&path, br#"{"env": {"A": "1"}, "shell": "zsh"}"#).unwrap();
        let error = TemplateConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("template.json") && error.contains("shell"),
            "{error}"
        );
    }

    #[test]
    fn start_processes_get_tags_and_defaults_come_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.json");
        std::fs::write(
            &path,
            br#"{"env": {"JUPYTER_PORT": "8888"}, "user": "user", "workdir": "/home/user",
                 "start": [{"process": {"cmd": "jupyter", "args": ["server"]}, "tag": "jupyter"},
                           {"process": {"cmd": "sleep", "args": ["infinity"]}}]}"#,
        )
        .unwrap();
        let config = TemplateConfig::load(&path).unwrap().unwrap();
        let defaults = config.defaults();
        assert_eq!(defaults.env["JUPYTER_PORT"], "8888");
        assert_eq!(defaults.user.as_deref(), Some("user"));
        let tags: Vec<Option<String>> =
            config.start_requests().into_iter().map(|r| r.tag).collect();
        assert_eq!(tags, [Some("jupyter".into()), Some("start-1".into())]);
        assert!(!format!("{config:?}").contains("8888"));
    }
}
