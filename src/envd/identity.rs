//! A guest's own identity. Many guests may continue from one memory snapshot (every create is a
//! restore of its template's boot snapshot, and snapshot templates and forks start several
//! guests from one instant), and each wakes with the snapshot's random state, hostname and
//! machine ID. Before any user code runs, the host gives each guest fresh entropy (mixed into
//! the kernel's pool, which is then reseeded, so `getrandom`, `/dev/urandom` and UUIDs diverge
//! at once), its own hostname and its own machine ID through `/init`.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use super::init::write_hosts;

/// The fewest random bytes accepted: a full reseed of the kernel's ChaCha20 key.
pub const MIN_ENTROPY_BYTES: usize = 32;
pub const MAX_ENTROPY_BYTES: usize = 512;

/// `_IOW('R', 0x03, int[2])`: adds bytes to the input pool and credits their entropy.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`: reseeds the kernel's random generator from the input pool now.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("`entropy` must be {MIN_ENTROPY_BYTES} to {MAX_ENTROPY_BYTES} bytes of hex")]
    Entropy,
    #[error("`hostname` must be 1 to 63 lowercase letters, digits or `-`, not starting with `-`")]
    Hostname,
    #[error("`machine_id` must be 32 lowercase hex digits, not all zero")]
    MachineId,
    #[error("{what}: {errno}")]
    System { what: &'static str, errno: Errno },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Fresh random bytes from the host, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(Vec<u8>);

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entropy({} bytes)", self.0.len())
    }
}

impl Entropy {
    pub fn from_hex(text: &str) -> Result<Self, IdentityError> {
        let bytes = hex::decode(text).map_err(|_| IdentityError::Entropy)?;
        if (MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&bytes.len()) {
            Ok(Self(bytes))
        } else {
            Err(IdentityError::Entropy)
        }
    }

    /// Mixes the bytes into the kernel's input pool, credited in full, and reseeds the
    /// generator from it, so every read after this one differs from any other guest's.
    pub fn apply(&self) -> Result<(), IdentityError> {
        let urandom = File::options()
            .write(true)
            .open("/dev/urandom")
            .map_err(|source| IdentityError::Io {
                what: "opening /dev/urandom",
                source,
            })?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in
        // words so that it is aligned as the kernel's struct is. The byte order within a word
        // does not matter for random bytes.
        let len = u32::try_from(self.0.len()).map_err(|_| IdentityError::Entropy)?;
        let mut info = vec![0u32; 2 + self.0.len().div_ceil(4)];
        info[0] = len * 8;
        info[1] = len;
        for (i, byte) in self.0.iter().enumerate() {
            info[2 + i / 4] |= u32::from(*byte) << (8 * (i % 4));
        }
        // SAFETY: `info` outlives the call and holds the header and `buf_size` bytes after it.
        let added = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
        Errno::result(added).map_err(|errno| IdentityError::System {
            what: "adding entropy",
            errno,
        })?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        let reseeded = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
        Errno::result(reseeded).map_err(|errno| IdentityError::System {
            what: "reseeding the random generator",
            errno,
        })?;
        Ok(())
    }
}

/// A guest's host name: one DNS label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname(String);

impl Hostname {
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let valid = (1..=63).contains(&text.len())
            && !text.starts_with('-')
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdentityError::Hostname)
        }
    }

    /// Sets the kernel's host name and names it in `/etc/hostname` and `/etc/hosts`.
    pub fn apply(&self) -> Result<(), IdentityError> {
        nix::unistd::sethostname(&self.0).map_err(|errno| IdentityError::System {
            what: "setting the hostname",
            errno,
        })?;
        std::fs::write("/etc/hostname", format!("{}\n", self.0)).map_err(|source| {
            IdentityError::Io {
                what: "writing /etc/hostname",
                source,
            }
        })?;
        write_hosts(&self.0);
        Ok(())
    }
}

/// `/etc/machine-id`: 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineId(String);

impl MachineId {
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let valid = text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && text.bytes().any(|b| b != b'0');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdentityError::MachineId)
        }
    }

    pub fn apply(&self) -> Result<(), IdentityError> {
        std::fs::write("/etc/machine-id", format!("{}\n", self.0)).map_err(|source| {
            IdentityError::Io {
                what: "writing /etc/machine-id",
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked() {
        assert!(Entropy::from_hex(&"ab".repeat(32)).is_ok());
        assert!(Entropy::from_hex(&"ab".repeat(31)).is_err());
        assert!(Entropy::from_hex(&"ab".repeat(513)).is_err());
        assert!(Entropy::from_hex(&"zz".repeat(32)).is_err());
        assert!(format!("{:?}", Entropy::from_hex(&"ab".repeat(32)).unwrap()).contains("32 bytes"));
        for good in ["cl-abc123", "a", &"x".repeat(63)] {
            assert!(Hostname::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a.b", "a_b", &"x".repeat(64)] {
            assert!(Hostname::parse(bad).is_err(), "{bad}");
        }
        assert!(MachineId::parse(&"0123456789abcdef".repeat(2)).is_ok());
        for bad in [
            "0".repeat(32),
            "A".repeat(32),
            "a".repeat(31),
            "g".repeat(32),
        ] {
            assert!(MachineId::parse(&bad).is_err(), "{bad}");
        }
    }
}
