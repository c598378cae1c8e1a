//! Build identity printed by `wrenn version` and reported by every component.

/// The release version of this build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the build came from, when the build recorded it (`just build` does).
pub const GIT_COMMIT: Option<&str> = option_env!("WRENN_GIT_COMMIT");

pub fn long() -> String {
    let linkage = if cfg!(target_feature = "crt-static") { "static" } else { "dynamic" };
    format!(
        "wrenn {VERSION} (commit {}, {} {}, {linkage})",
        GIT_COMMIT.unwrap_or("unknown"),
        std::env::consts::ARCH,
        std::env::consts::OS,
    )
}
