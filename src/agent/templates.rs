//! The template images this host holds: every `images/<name>/rootfs.ext4` under a valid template
//! name, with its size and the checksum its `meta.json` records.

use crate::agent::wire::HeldTemplate;
use crate::config::Layout;
use crate::template::TemplateName;

/// Read on every listing: a directory scan and one small file per template, so an image built
/// or removed while the agent runs is reported at once.
pub fn held(layout: &Layout) -> Vec<HeldTemplate> {
    let Ok(entries) = std::fs::read_dir(layout.images_dir()) else {
        return Vec::new();
    };
    let mut held: Vec<HeldTemplate> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name: TemplateName = entry.file_name().to_str()?.parse().ok()?;
            let image = std::fs::metadata(layout.image_rootfs(name.as_str())).ok()?;
            if !image.is_file() {
                return None;
            }
            Some(HeldTemplate {
                sha256: recorded_sha256(layout, &name),
                size_bytes: image.len(),
                name,
            })
        })
        .collect();
    held.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    held
}

fn recorded_sha256(layout: &Layout, name: &TemplateName) -> Option<String> {
    let meta = std::fs::read(layout.image_dir(name.as_str()).join("meta.json")).ok()?;
    let meta: serde_json::Value = serde_json::from_slice(&meta).ok()?;
    meta["sha256"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_images_with_a_rootfs_under_valid_names() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        assert!(held(&layout).is_empty(), "no images directory at all");
        for (name, with_image) in [("python", true), ("minimal", true), ("half", false)] {
            std::fs::create_dir_all(layout.image_dir(name)).unwrap();
            if with_image {
                std::fs::write(layout.image_rootfs(name), vec![0; 4096]).unwrap();
            }
        }
        std::fs::write(
            layout.image_dir("python").join("meta.json"),
            r#"{"template": "python", "sha256": "abc"}"#,
        )
        .unwrap();
        std::fs::create_dir_all(layout.images_dir().join(".hidden")).unwrap();
        std::fs::write(layout.images_dir().join(".hidden/rootfs.ext4"), b"x").unwrap();
        let names: Vec<(String, u64, Option<String>)> = held(&layout)
            .into_iter()
            .map(|t| (t.name.to_string(), t.size_bytes, t.sha256))
            .collect();
        assert_eq!(
            names,
            [
                ("minimal".to_owned(), 4096, None),
                ("python".to_owned(), 4096, Some("abc".to_owned()))
            ]
        );
    }
}
