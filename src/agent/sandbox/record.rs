//! Each sandbox's state on disk, `sandboxes/<id>/sandbox.json`: what a restarted agent needs to
//! adopt a sandbox whose VMM still runs, or to keep a paused one resumable. It is rewritten
//! whenever the sandbox settles (running after a create or resume, paused after a pause),
//! atomically: a crash leaves the old record or the new one, never half of one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::SandboxError;
use crate::agent::wire::CreateSandbox;
use crate::config::Layout;
use crate::secret::SecretText;

/// The version of this record's shape; a record of another version is not adopted.
pub const RECORD_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub format: u32,
    pub request: CreateSandbox,
    pub created_at: DateTime<Utc>,
    /// The token envd in the guest expects; it survives a pause in the guest's memory.
    pub access_token: SecretText,
    pub state: RecordedState,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Where the sandbox was when it last settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum RecordedState {
    /// Its VMM process runs, in the network of `slot`.
    Running { vmm_pid: u32, slot: u32 },
    /// Its whole state is in `snapshots/<id>/`; nothing of it runs.
    Paused,
}

impl SandboxRecord {
    /// Writes the record durably: a new file, synced, renamed over the old one, directory synced.
    pub fn save(&self, layout: &Layout) -> Result<(), SandboxError> {
        let id = self.request.sandbox_id.to_string();
        let path = layout.sandbox_record(&id);
        let partial = Layout::partial(&path);
        let io = |what: &str, path: &Path| {
            let what = format!("{what} {}", path.display());
            move |source| SandboxError::Io { what, source }
        };
        let json = serde_json::to_vec_pretty(self).expect("a record serialises");
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io("creating", &partial))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(io("writing", &partial))?;
        fs::rename(&partial, &path).map_err(io("renaming into", &path))?;
        let dir = layout.sandbox_dir(&id);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &dir))
    }

    /// The record at `path`, if it is readable and of this format.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let record: Self = serde_json::from_slice(&bytes)
            .map_err(|e| format!("parsing {}: {e}", path.display()))?;
        if record.format != RECORD_FORMAT {
            return Err(format!(
                "{} has format {}, this agent reads {RECORD_FORMAT}",
                path.display(),
                record.format
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::SandboxId;

    #[test]
    fn a_saved_record_loads_back_and_another_format_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let id = SandboxId::new_random();
        fs::create_dir_all(layout.sandbox_dir(&id.to_string())).unwrap();
        let mut record = SandboxRecord {
            format: RECORD_FORMAT,
            request: CreateSandbox {
                sandbox_id: id,
                template: "minimal".parse().unwrap(),
                vcpus: 1,
                memory_mb: 256,
                disk_mb: 512,
                timeout_sec: 30,
                envs: BTreeMap::from([("API_KEY".into(), "sk-secret".into())]),
                user: None,
                image: None,
                snapshot: None,
                egress: Default::default(),
            },
            created_at: Utc::now(),
            access_token: SecretText::new("t".repeat(64)),
            state: RecordedState::Running {
                vmm_pid: 42,
                slot: 3,
            },
            metadata: BTreeMap::from([("vmm".into(), "qemu".into())]),
        };
        let shown = format!("{record:?}");
        assert!(
            !shown.contains("tttt") && !shown.contains("sk-secret") && shown.contains("API_KEY"),
            "{shown}"
        );
        let path = layout.sandbox_record(&id.to_string());
        record.save(&layout).unwrap();
        assert_eq!(SandboxRecord::load(&path).unwrap(), record);
        assert!(!Layout::partial(&path).exists());

        record.state = RecordedState::Paused;
        record.save(&layout).unwrap();
        assert_eq!(
            SandboxRecord::load(&path).unwrap().state,
            RecordedState::Paused
        );

        record.format = RECORD_FORMAT + 1;
        record.save(&layout).unwrap();
        let refused = SandboxRecord::load(&path).unwrap_err();
        assert!(refused.contains("format"), "{refused}");
        fs::write(&path, b"{").unwrap();
        assert!(SandboxRecord::load(&path).unwrap_err().contains("parsing"));
    }
}
