//! Templates. Here, their names: one checked type for every hop that carries one (the public API,
//! the scheduler, the agent API and the files root's `images/<name>/`), so a name is judged the
//! same way everywhere. Beside it: importing a container image as a template's image (reading
//! the archive into a directory tree, [`oci`], and making the ext4 image of it, [`image`]), and
//! building one from a recipe ([`recipe`], with its uploaded files checked by [`archive`]).

pub mod archive;
pub mod image;
pub mod oci;
pub mod recipe;
mod tree;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest template name; it becomes one path component under `images/`.
pub const MAX_TEMPLATE_NAME_LEN: usize = 128;

/// The template a create request names when it names none.
pub const DEFAULT_TEMPLATE: &str = "minimal";

/// 1-128 ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit (so never
/// `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a template name: 1-{MAX_TEMPLATE_NAME_LEN} letters, digits, '.', '_' or '-', \
     starting with a letter or digit"
)]
pub struct TemplateNameError(String);

impl TemplateName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn default_template() -> Self {
        Self(DEFAULT_TEMPLATE.to_owned())
    }
}

impl FromStr for TemplateName {
    type Err = TemplateNameError;

    fn from_str(name: &str) -> Result<Self, TemplateNameError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_TEMPLATE_NAME_LEN
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            // A hostile name can be long: quote only its start.
            let shown: String = name.chars().take(MAX_TEMPLATE_NAME_LEN + 1).collect();
            Err(TemplateNameError(shown))
        }
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for TemplateName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TemplateName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "minimal",
            "python-3.12",
            "a",
            "team_tpl.v2",
            &"x".repeat(128),
        ] {
            assert_eq!(name.parse::<TemplateName>().unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_paths_and_oddities() {
        for name in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-x",
            ".hidden",
            "é",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(name.parse::<TemplateName>().is_err(), "{name:?}");
        }
        let err = serde_json::from_str::<TemplateName>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("not a template name"), "{err}");
    }
}
