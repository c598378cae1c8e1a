//! Harnesses shared by Wrenn's integration tests and benchmarks: real services, started
//! privately and cleaned up however the caller ends. A workspace member of its own, so none of
//! it is compiled into the `wrenn` binary (the one that ships, and that runs as PID 1 in every
//! guest); `wrenn` takes it as a dev-dependency, and tests import it as `wrenn_test_support`.

use std::path::{Path, PathBuf};

pub mod dns;
pub mod envd;
pub mod guest;
pub mod kernel;
pub mod peer;
pub mod pg;

/// The repository root: where `justfile` and `rootfs/` live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[cfg(test)]
mod tests {
    #[test]
    fn repo_root_holds_the_justfile_and_the_rootfs_scripts() {
        let root = super::repo_root();
        assert!(root.join("justfile").is_file(), "{}", root.display());
        assert!(root.join("rootfs/build-kernel.sh").is_file());
    }
}
