//! The host sysctls sandbox networking needs (`net.ipv4.ip_forward`): each is written only
//! when it differs, and the value the host had is recorded in the files root, so that this
//! agent, or a later one that took its sandboxes over, puts it back when it leaves the host
//! with nothing that needs it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What sandbox networking needs of the host: forwarding between the sandboxes' links and the
/// egress interface.
pub const HOST_SYSCTLS: &[(&str, &str)] = &[("net/ipv4/ip_forward", "1")];

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the record of the host's sysctls {path} is unreadable: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The host's sysctls under `proc_sys` (`/proc/sys`) and the record of their original values.
#[derive(Debug, Clone)]
pub struct HostSysctls {
    proc_sys: PathBuf,
    record: PathBuf,
}

impl HostSysctls {
    pub fn new(proc_sys: impl Into<PathBuf>, record: impl Into<PathBuf>) -> Self {
        Self {
            proc_sys: proc_sys.into(),
            record: record.into(),
        }
    }

    fn read(&self, key: &str) -> Result<String, SysctlError> {
        let path = self.proc_sys.join(key);
        fs::read_to_string(&path)
            .map(|v| v.trim().to_owned())
            .map_err(|source| SysctlError::Io {
                what: "read",
                path,
                source,
            })
    }

    fn recorded(&self) -> Result<BTreeMap<String, String>, SysctlError> {
        match fs::read(&self.record) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SysctlError::Record {
                path: self.record.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(SysctlError::Io {
                what: "read",
                path: self.record.clone(),
                source,
            }),
        }
    }

    /// Writes the record whole or not at all, so a crash never leaves half of it.
    fn save(&self, recorded: &BTreeMap<String, String>) -> Result<(), SysctlError> {
        let failed = |what, source| SysctlError::Io {
            what,
            path: self.record.clone(),
            source,
        };
        if recorded.is_empty() {
            return match fs::remove_file(&self.record) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(failed("remove", e)),
                _ => Ok(()),
            };
        }
        let partial = self.record.with_extension("partial");
        let json = serde_json::to_vec_pretty(recorded).expect("a map of strings serializes");
        fs::write(&partial, json).map_err(|e| failed("write", e))?;
        fs::rename(&partial, &self.record).map_err(|e| failed("write", e))
    }

    /// Sets each of `wanted` that differs, recording the value it had first. A value already
    /// recorded (by an earlier agent process that changed it) is the host's own and is kept.
    pub fn ensure(&self, wanted: &[(&str, &str)]) -> Result<(), SysctlError> {
        let mut recorded = self.recorded()?;
        for (key, value) in wanted {
            let current = self.read(key)?;
            if current == *value {
                continue;
            }
            // Recorded before the write: a crash in between leaves a record, never a change
            // nobody knows about.
            recorded.entry((*key).to_owned()).or_insert(current.clone());
            self.save(&recorded)?;
            let path = self.proc_sys.join(key);
            fs::write(&path, value).map_err(|source| SysctlError::Io {
                what: "write",
                path,
                source,
            })?;
            tracing::info!(sysctl = %key, from = %current, to = %value, "host sysctl changed for sandbox networking; restored when the agent leaves the host");
        }
        Ok(())
    }

    /// Puts back every value the agent changed and forgets the record.
    pub fn restore(&self) -> Result<(), SysctlError> {
        let recorded = self.recorded()?;
        for (key, value) in &recorded {
            let path = self.proc_sys.join(key);
            fs::write(&path, value).map_err(|source| SysctlError::Io {
                what: "restore",
                path,
                source,
            })?;
            tracing::info!(sysctl = %key, to = %value, "host sysctl restored");
        }
        self.save(&BTreeMap::new())
    }
}

/// Whether any network namespace is mounted under `/run/netns`: another agent's (or other
/// software's) namespaces may rely on the host forwarding, so then nothing is restored.
pub fn other_namespaces_exist(run_netns: &Path) -> bool {
    fs::read_dir(run_netns).is_ok_and(|mut entries| entries.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> (tempfile::TempDir, HostSysctls) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sys/net/ipv4")).unwrap();
        fs::write(
            dir.path().join("sys/net/ipv4/ip_forward"),
            format!("{value}\n"),
        )
        .unwrap();
        let sysctls =
            HostSysctls::new(dir.path().join("sys"), dir.path().join("host-sysctls.json"));
        (dir, sysctls)
    }

    fn forwarding(dir: &tempfile::TempDir) -> String {
        fs::read_to_string(dir.path().join("sys/net/ipv4/ip_forward"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_changed_sysctl_is_recorded_and_restored_once() {
        let (dir, sysctls) = host("0");
        sysctls.ensure(HOST_SYSCTLS).unwrap();
        assert_eq!(forwarding(&dir), "1");
        // A later agent process finds it on, and the host's own value still recorded.
        sysctls.ensure(HOST_SYSCTLS).unwrap();
        assert_eq!(sysctls.recorded().unwrap()["net/ipv4/ip_forward"], "0");
        sysctls.restore().unwrap();
        assert_eq!(forwarding(&dir), "0");
        assert!(!dir.path().join("host-sysctls.json").exists());
        // Nothing recorded: nothing to put back.
        fs::write(dir.path().join("sys/net/ipv4/ip_forward"), "1").unwrap();
        sysctls.restore().unwrap();
        assert_eq!(forwarding(&dir), "1");
    }

    #[test]
    fn a_sysctl_already_as_needed_is_neither_written_nor_restored() {
        let (dir, sysctls) = host("1");
        sysctls.ensure(HOST_SYSCTLS).unwrap();
        assert!(!dir.path().join("host-sysctls.json").exists());
        sysctls.restore().unwrap();
        assert_eq!(forwarding(&dir), "1");
    }
}
