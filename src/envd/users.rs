//! Guest accounts read straight from /etc/passwd and /etc/group: the guest may be busybox, and a
//! static binary cannot rely on NSS.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user `{0}` does not exist in /etc/passwd")]
    UnknownUser(String),
    #[error("could not read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One account, with everything needed to run a process as it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Primary group first, then every group listing the user as a member.
    pub groups: Vec<u32>,
}

/// The parsed account databases.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    passwd: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

impl Accounts {
    pub fn load() -> Result<Self, UserError> {
        Self::load_from(Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    pub fn load_from(passwd: &Path, group: &Path) -> Result<Self, UserError> {
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            // A root filesystem without /etc/group still has working users.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(UserError::Unreadable {
                path: path.to_owned(),
                source,
            }),
        };
        Ok(Self::parse(&read(passwd)?, &read(group)?))
    }

    pub fn parse(passwd: &str, group: &str) -> Self {
        let passwd = passwd
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 7 || line.starts_with('#') {
                    return None;
                }
                Some(PasswdEntry {
                    name: f[0].to_owned(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_owned(),
                    shell: f[6].to_owned(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 4 || line.starts_with('#') {
                    return None;
                }
                Some(GroupEntry {
                    name: f[0].to_owned(),
                    gid: f[2].parse().ok()?,
                    members: f[3]
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect(),
                })
            })
            .collect();
        Self { passwd, groups }
    }

    pub fn account(&self, name: &str) -> Result<Account, UserError> {
        let entry = self
            .passwd
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| UserError::UnknownUser(name.to_owned()))?;
        let mut groups = vec![entry.gid];
        groups.extend(
            self.groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m == name) && g.gid != entry.gid)
                .map(|g| g.gid),
        );
        Ok(Account {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home: PathBuf::from(if entry.home.is_empty() {
                "/"
            } else {
                &entry.home
            }),
            shell: if entry.shell.is_empty() {
                "/bin/sh".into()
            } else {
                entry.shell.clone()
            },
            groups,
        })
    }

    /// The named account, or the one envd itself runs as when no name is given.
    pub fn effective(&self, name: Option<&str>) -> Result<Account, UserError> {
        if let Some(name) = name {
            return self.account(name);
        }
        let uid = nix::unistd::geteuid().as_raw();
        match self.passwd.iter().find(|e| e.uid == uid) {
            Some(entry) => self.account(&entry.name.clone()),
            None => {
                let gid = nix::unistd::getegid().as_raw();
                Ok(Account {
                    name: uid.to_string(),
                    uid,
                    gid,
                    home: PathBuf::from("/"),
                    shell: "/bin/sh".into(),
                    groups: vec![gid],
                })
            }
        }
    }

    pub fn user_name(&self, uid: u32) -> String {
        self.passwd
            .iter()
            .find(|e| e.uid == uid)
            .map(|e| e.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.clone())
            .unwrap_or_else(|| gid.to_string())
    }
}

/// Resolves a request path: `~` and `~/x` expand to the home, relative paths join the home.
pub fn resolve_path(raw: &str, home: &Path) -> Option<PathBuf> {
    if raw.is_empty() || raw.contains('\0') {
        return None;
    }
    let path = if raw == "~" {
        home.to_path_buf()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        home.join(rest)
    } else if raw.starts_with('/') {
        PathBuf::from(raw)
    } else {
        home.join(raw)
    };
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        user:x:1000:1000::/home/user:/bin/sh\n\
        # comment\n\
        broken:x:notanumber:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nwheel:x:10:root,user\naudio:x:29:user\n";

    #[test]
    fn resolves_accounts_with_supplementary_groups() {
        let accounts = Accounts::parse(PASSWD, GROUP);
        let user = accounts.account("user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.groups, vec![1000, 10, 29]);
        assert!(matches!(
            accounts.account("broken"),
            Err(UserError::UnknownUser(_))
        ));
        assert!(matches!(
            accounts.account("nobody"),
            Err(UserError::UnknownUser(_))
        ));
        assert_eq!(accounts.user_name(0), "root");
        assert_eq!(accounts.user_name(4242), "4242");
        assert_eq!(accounts.group_name(10), "wheel");
    }

    #[test]
    fn expands_home_and_relative_paths() {
        let home = Path::new("/home/user");
        assert_eq!(
            resolve_path("~", home).unwrap(),
            PathBuf::from("/home/user")
        );
        assert_eq!(
            resolve_path("~/a/b", home).unwrap(),
            PathBuf::from("/home/user/a/b")
        );
        assert_eq!(
            resolve_path("a", home).unwrap(),
            PathBuf::from("/home/user/a")
        );
        assert_eq!(resolve_path("/etc", home).unwrap(), PathBuf::from("/etc"));
        assert!(resolve_path("", home).is_none());
        assert!(resolve_path("a\0b", home).is_none());
    }
}
