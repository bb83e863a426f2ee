//! `packages/<name>.toml`: package recipes. A recipe names Debian packages and
//! declares, reviewably, what their maintainer scripts would have done
//! (alternatives, enabled units), plus our own binaries and files.
//!
//! k3s has recipes of its own (`packages/k3s.toml`, `packages/k3s-stand-in.toml`):
//! an upstream binary pinned by URL and sha256 per architecture, or a labelled
//! stand-in that tests use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use os_format::layout::Arch;
use serde::Deserialize;

use crate::error::{BuildError, Result};

pub const PACKAGES_DIR: &str = "packages";
pub const K3S_RECIPE: &str = "k3s";
pub const K3S_STAND_IN_RECIPE: &str = "k3s-stand-in";

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Alternative {
    pub link: String,
    pub name: String,
    pub path: String,
}

/// A file from `packages/` copied into the root.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Relative to `packages/`.
    pub source: String,
    /// Absolute path in the image.
    pub target: String,
    /// Octal permission bits, e.g. "0644".
    pub mode: String,
}

/// A symbolic link made in the root (what a postinst's `ln -s` would do).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecipeLink {
    /// Absolute path of the link in the image.
    pub path: String,
    /// What it points to, as written (relative or absolute).
    pub target: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub description: String,
    #[serde(default)]
    pub debian: Vec<String>,
    #[serde(default)]
    pub alternatives: Vec<Alternative>,
    #[serde(default)]
    pub enable: Vec<String>,
    /// Cargo binaries from this workspace, installed to /usr/bin.
    #[serde(default)]
    pub binaries: Vec<String>,
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// Symbolic links, made after the files.
    #[serde(default)]
    pub links: Vec<RecipeLink>,
    #[serde(skip)]
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAsset {
    pub url: String,
    pub sha256: String,
}

/// An upstream binary pinned by official URL and sha256 per architecture, or a
/// stand-in shipped in `packages/` (exactly one of `arch` and `file`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRecipe {
    pub description: String,
    /// The name the manifest records (`k3s`, or `k3s-stand-in`).
    pub name: String,
    pub version: String,
    /// Where the binary goes in the image.
    pub install: String,
    #[serde(default)]
    pub arch: BTreeMap<String, UpstreamAsset>,
    /// A stand-in's file, relative to `packages/`.
    #[serde(default)]
    pub file: Option<String>,
    /// Extra files (unit files) installed with it.
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    #[serde(skip)]
    pub path: PathBuf,
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BuildError::Config {
                file: path.to_path_buf(),
                message: format!("no such {what}; expected a TOML file here"),
            }
        } else {
            BuildError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    toml::from_str(&text).map_err(|error| crate::error::toml_error(path, &text, &error))
}

pub fn recipe_path(project_root: &Path, name: &str) -> PathBuf {
    project_root.join(PACKAGES_DIR).join(format!("{name}.toml"))
}

impl Recipe {
    pub fn load(project_root: &Path, name: &str) -> Result<Recipe> {
        let path = recipe_path(project_root, name);
        let mut recipe: Recipe = read_toml(&path, "recipe")?;
        recipe.name = name.to_string();
        for file in &recipe.files {
            validate_file(&path, project_root, file)?;
        }
        for link in &recipe.links {
            if !link.path.starts_with('/') || link.target.is_empty() {
                return Err(BuildError::ConfigKey {
                    file: path.clone(),
                    key: "links".into(),
                    message: format!(
                        "`{}` -> `{}`: expected an absolute path and a non-empty target",
                        link.path, link.target
                    ),
                });
            }
        }
        Ok(recipe)
    }
}

fn validate_file(recipe_file: &Path, project_root: &Path, file: &RecipeFile) -> Result<()> {
    if !file.target.starts_with('/') {
        return Err(BuildError::ConfigKey {
            file: recipe_file.to_path_buf(),
            key: "files.target".into(),
            message: format!("`{}` must be an absolute path in the image", file.target),
        });
    }
    parse_mode(&file.mode).ok_or_else(|| BuildError::ConfigKey {
        file: recipe_file.to_path_buf(),
        key: "files.mode".into(),
        message: format!("`{}` is not an octal mode like \"0644\"", file.mode),
    })?;
    let source = project_root.join(PACKAGES_DIR).join(&file.source);
    if !source.is_file() {
        return Err(BuildError::ConfigKey {
            file: recipe_file.to_path_buf(),
            key: "files.source".into(),
            message: format!("{} does not exist", source.display()),
        });
    }
    Ok(())
}

pub fn parse_mode(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
}

impl UpstreamRecipe {
    pub fn load(project_root: &Path, name: &str) -> Result<UpstreamRecipe> {
        let path = recipe_path(project_root, name);
        let mut recipe: UpstreamRecipe = read_toml(&path, "upstream recipe")?;
        recipe.path = path.clone();
        match (&recipe.file, recipe.arch.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Err(BuildError::Config {
                    file: path,
                    message: "expected exactly one of `file` (a stand-in) and `[arch.*]` pins"
                        .into(),
                })
            }
            _ => {}
        }
        for (arch, asset) in &recipe.arch {
            if !matches!(arch.as_str(), "x86_64" | "aarch64") {
                return Err(BuildError::ConfigKey {
                    file: path.clone(),
                    key: format!("arch.{arch}"),
                    message: "expected x86_64 or aarch64".into(),
                });
            }
            if asset.sha256.len() != 64 || hex::decode(&asset.sha256).is_err() {
                return Err(BuildError::ConfigKey {
                    file: path.clone(),
                    key: format!("arch.{arch}.sha256"),
                    message: format!("`{}` is not 64 hexadecimal digits", asset.sha256),
                });
            }
        }
        for file in &recipe.files {
            validate_file(&path, project_root, file)?;
        }
        Ok(recipe)
    }

    pub fn asset(&self, arch: Arch) -> Result<&UpstreamAsset> {
        self.arch
            .get(arch.as_str())
            .ok_or_else(|| BuildError::ConfigKey {
                file: self.path.clone(),
                key: format!("arch.{arch}"),
                message: format!("no pin for {arch}; expected a url and sha256"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0755"), Some(0o755));
        assert_eq!(parse_mode("rwx"), None);
        assert_eq!(parse_mode("77777"), None);
    }

    #[test]
    fn unknown_recipe_keys_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::create_dir(directory.path().join(PACKAGES_DIR)).unwrap();
        std::fs::write(
            recipe_path(directory.path(), "x"),
            "description = \"x\"\ndebain = [\"bash\"]\n",
        )
        .unwrap();
        let error = Recipe::load(directory.path(), "x").unwrap_err().to_string();
        assert!(error.contains("unknown field `debain`"), "{error}");
        assert!(error.contains("packages/x.toml"), "{error}");
    }

    #[test]
    fn links_need_an_absolute_path() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::create_dir(directory.path().join(PACKAGES_DIR)).unwrap();
        let write = |links: &str| {
            std::fs::write(
                recipe_path(directory.path(), "x"),
                format!("description = \"x\"\nlinks = [{links}]\n"),
            )
            .unwrap();
        };
        write(
            r#"{ path = "/etc/resolv.conf", target = "../run/systemd/resolve/stub-resolv.conf" }"#,
        );
        let recipe = Recipe::load(directory.path(), "x").unwrap();
        assert_eq!(recipe.links[0].path, "/etc/resolv.conf");
        write(r#"{ path = "etc/resolv.conf", target = "x" }"#);
        let error = Recipe::load(directory.path(), "x").unwrap_err().to_string();
        assert!(
            error.contains("packages/x.toml")
                && error.contains("`links`")
                && error.contains("absolute"),
            "{error}"
        );
    }
}
