//! Unpacking Debian binary packages (`.deb`) without dpkg: the `ar` container,
//! then `data.tar.{xz,zst,gz}` extracted into a tree with merged `/usr`
//! (`/bin`, `/sbin`, `/lib*` land under `/usr`, as Debian's usrmerge does), with
//! numeric ownership and permission bits as the package declares them.
//! Maintainer scripts are not run; what they would do is declared in the
//! recipes and applied by `compose`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{BuildError, Result};

/// Top-level directories that are symlinks into /usr in a merged-/usr tree.
pub const MERGED_USR_DIRECTORIES: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// Paths not installed (documentation and manual pages), except copyright files.
const EXCLUDED_PREFIXES: [&str; 5] = [
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/locale/",
];

#[derive(Debug, Default, Clone)]
pub struct UnpackReport {
    pub files: u64,
    pub bytes: u64,
    pub excluded: u64,
}

/// Map a path from a package onto the merged-/usr tree: `./bin/ls` -> `usr/bin/ls`.
/// Returns None for the root itself; errors on paths escaping the tree.
pub fn merged_usr_path(path: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let mut parts: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir | Component::RootDir => {}
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path `{}` escapes the tree", path.display()))
            }
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    if MERGED_USR_DIRECTORIES.contains(&parts[0].as_str())
        || parts[0] == "lib32"
        || parts[0] == "libx32"
    {
        parts.insert(0, "usr".to_string());
    }
    Ok(Some(parts.iter().collect()))
}

/// Where `relative` lands inside `root`, following symlinks among its parent
/// directories as they would resolve with `root` as `/` (an absolute link
/// target is re-rooted; `..` never climbs above `root`). The last component
/// itself is not followed. This keeps a package's files inside the tree even
/// where an earlier package made a directory an absolute symlink
/// (e.g. /usr/lib/ssl/certs -> /etc/ssl/certs).
pub fn confined_path(root: &Path, relative: &Path) -> std::result::Result<PathBuf, String> {
    let mut parts: Vec<std::ffi::OsString> = relative
        .components()
        .filter_map(|component| match component {
            Component::Normal(part) => Some(part.to_os_string()),
            _ => None,
        })
        .collect();
    let Some(last) = parts.pop() else {
        return Ok(root.to_path_buf());
    };
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = parts.into();
    let mut links_followed = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        match std::fs::read_link(&candidate) {
            Ok(target) => {
                links_followed += 1;
                if links_followed > 40 {
                    return Err(format!(
                        "too many symlinks resolving {}",
                        relative.display()
                    ));
                }
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut expansion: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|component| match component {
                        Component::Normal(part) => Some(part.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                expansion.extend(pending.drain(..));
                pending = expansion.into();
            }
            Err(_) => resolved.push(part),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()).join(last))
}

fn is_excluded(path: &Path) -> bool {
    let text = path.to_string_lossy();
    EXCLUDED_PREFIXES
        .iter()
        .any(|prefix| text.starts_with(prefix))
        && !(text.starts_with("usr/share/doc/") && text.ends_with("/copyright"))
}

/// Open the data member of a .deb as a decompressing reader.
fn with_data_tar<T>(deb: &Path, mut body: impl FnMut(&mut dyn Read) -> Result<T>) -> Result<T> {
    let file = std::fs::File::open(deb).map_err(BuildError::io(deb))?;
    let mut archive = ar::Archive::new(file);
    while let Some(entry) = archive.next_entry() {
        let entry = entry.map_err(BuildError::io(deb))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        let bad = |message: String| BuildError::Package {
            what: deb.display().to_string(),
            message,
        };
        if let Some(compression) = name.strip_prefix("data.tar") {
            return match compression {
                ".xz" => body(&mut xz2::read::XzDecoder::new(entry)),
                ".zst" => body(&mut zstd::stream::read::Decoder::new(entry).map_err(BuildError::io(deb))?),
                "" => body(&mut { entry }),
                other => Err(bad(format!(
                    "data member `data.tar{other}` uses a compression this builder does not read; expected .xz, .zst or none"
                ))),
            };
        }
    }
    Err(BuildError::Package {
        what: deb.display().to_string(),
        message: "no data.tar member; not a Debian binary package".into(),
    })
}

/// Extract a package's files into `root` (a merged-/usr tree that `prepare_tree` made).
pub fn unpack_deb(deb: &Path, root: &Path) -> Result<UnpackReport> {
    let what = deb.display().to_string();
    let package_error = |message: String| BuildError::Package {
        what: what.clone(),
        message,
    };
    with_data_tar(deb, |reader| {
        let mut report = UnpackReport::default();
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(BuildError::io(deb))?;
        for entry in entries {
            let mut entry = entry.map_err(BuildError::io(deb))?;
            let raw_path = entry.path().map_err(BuildError::io(deb))?.into_owned();
            let Some(relative) = merged_usr_path(&raw_path).map_err(&package_error)? else {
                continue;
            };
            if is_excluded(&relative) {
                report.excluded += 1;
                continue;
            }
            let target = confined_path(root, &relative).map_err(&package_error)?;
            let header = entry.header().clone();
            let mode = header.mode().map_err(BuildError::io(deb))? & 0o7777;
            let uid = header.uid().map_err(BuildError::io(deb))? as u32;
            let gid = header.gid().map_err(BuildError::io(deb))? as u32;
            if let Some(parent) = target.parent() {
                if !parent.is_dir() {
                    std::fs::create_dir_all(parent).map_err(BuildError::io(parent))?;
                }
            }
            match header.entry_type() {
                tar::EntryType::Directory => {
                    if target.is_symlink() {
                        // A directory the tree already has as a symlink (merged /usr): keep it.
                        continue;
                    }
                    if !target.is_dir() {
                        std::fs::create_dir(&target).map_err(BuildError::io(&target))?;
                    }
                    set_owner_and_mode(&target, uid, gid, mode)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    remove_existing(&target)?;
                    let mut output =
                        std::fs::File::create(&target).map_err(BuildError::io(&target))?;
                    report.bytes +=
                        std::io::copy(&mut entry, &mut output).map_err(BuildError::io(&target))?;
                    drop(output);
                    set_owner_and_mode(&target, uid, gid, mode)?;
                    report.files += 1;
                }
                tar::EntryType::Symlink => {
                    let link = header
                        .link_name()
                        .map_err(BuildError::io(deb))?
                        .ok_or_else(|| {
                            package_error(format!("symlink {} has no target", raw_path.display()))
                        })?;
                    remove_existing(&target)?;
                    std::os::unix::fs::symlink(&link, &target).map_err(BuildError::io(&target))?;
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                        .map_err(BuildError::io(&target))?;
                    report.files += 1;
                }
                tar::EntryType::Link => {
                    let link = header
                        .link_name()
                        .map_err(BuildError::io(deb))?
                        .ok_or_else(|| {
                            package_error(format!("hard link {} has no target", raw_path.display()))
                        })?;
                    let Some(link_relative) = merged_usr_path(&link).map_err(&package_error)?
                    else {
                        return Err(package_error(format!(
                            "hard link {} points at the root",
                            raw_path.display()
                        )));
                    };
                    remove_existing(&target)?;
                    let link_target =
                        confined_path(root, &link_relative).map_err(&package_error)?;
                    std::fs::hard_link(link_target, &target).map_err(BuildError::io(&target))?;
                    report.files += 1;
                }
                other => {
                    return Err(package_error(format!(
                        "{} is a {other:?}; packages may only hold files, directories and links",
                        raw_path.display()
                    )))
                }
            }
        }
        Ok(report)
    })
}

fn remove_existing(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(metadata) if metadata.is_dir() => Err(BuildError::Other(format!(
            "{} is a directory in the tree but a package ships a file there",
            target.display()
        ))),
        Ok(_) => std::fs::remove_file(target).map_err(BuildError::io(target)),
        Err(_) => Ok(()),
    }
}

fn set_owner_and_mode(target: &Path, uid: u32, gid: u32, mode: u32) -> Result<()> {
    // chown first: it clears set-id bits, which the mode then restores.
    std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(BuildError::io(target))?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))
        .map_err(BuildError::io(target))
}

/// The first file in a package whose path (as in the package, without `./`)
/// satisfies `wanted`: its path and contents. Used to read a kernel's config
/// before anything is unpacked.
pub fn read_file_from_deb(
    deb: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Option<(String, Vec<u8>)>> {
    with_data_tar(deb, |reader| {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(BuildError::io(deb))? {
            let mut entry = entry.map_err(BuildError::io(deb))?;
            let path = entry
                .path()
                .map_err(BuildError::io(deb))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if entry.header().entry_type() == tar::EntryType::Regular && wanted(&path) {
                let mut contents = Vec::new();
                entry
                    .read_to_end(&mut contents)
                    .map_err(BuildError::io(deb))?;
                return Ok(Some((path, contents)));
            }
        }
        Ok(None)
    })
}

/// Lay out an empty merged-/usr tree.
pub fn prepare_tree(root: &Path, with_lib64: bool) -> Result<()> {
    for directory in ["usr/bin", "usr/sbin", "usr/lib"] {
        std::fs::create_dir_all(root.join(directory))
            .map_err(BuildError::io(root.join(directory)))?;
    }
    for name in MERGED_USR_DIRECTORIES {
        if name == "lib64" && !with_lib64 {
            continue;
        }
        if name == "lib64" {
            std::fs::create_dir_all(root.join("usr/lib64"))
                .map_err(BuildError::io(root.join("usr/lib64")))?;
        }
        let link = root.join(name);
        std::os::unix::fs::symlink(format!("usr/{name}"), &link).map_err(BuildError::io(&link))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_move_under_usr() {
        assert_eq!(
            merged_usr_path(Path::new("./bin/ls")).unwrap(),
            Some(PathBuf::from("usr/bin/ls"))
        );
        assert_eq!(
            merged_usr_path(Path::new("./lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
            Some(PathBuf::from("usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        assert_eq!(
            merged_usr_path(Path::new("./etc/passwd")).unwrap(),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(merged_usr_path(Path::new("./")).unwrap(), None);
        assert!(merged_usr_path(Path::new("./../etc")).is_err());
    }

    #[test]
    fn absolute_symlinks_stay_inside_the_tree() {
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path();
        std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib/ssl")).unwrap();
        std::os::unix::fs::symlink("/etc/ssl/certs", root.join("usr/lib/ssl/certs")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("usr/lib/ssl/up")).unwrap();
        assert_eq!(
            confined_path(root, Path::new("usr/lib/ssl/certs/ca.pem")).unwrap(),
            root.join("etc/ssl/certs/ca.pem")
        );
        assert_eq!(
            confined_path(root, Path::new("usr/lib/ssl/up/etc/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        // The last component is not followed (a package may replace a link).
        assert_eq!(
            confined_path(root, Path::new("usr/lib/ssl/certs")).unwrap(),
            root.join("usr/lib/ssl/certs")
        );
    }

    #[test]
    fn documentation_is_left_out_but_copyright_kept() {
        assert!(is_excluded(Path::new("usr/share/doc/bash/README")));
        assert!(!is_excluded(Path::new("usr/share/doc/bash/copyright")));
        assert!(is_excluded(Path::new("usr/share/man/man1/ls.1.gz")));
        assert!(!is_excluded(Path::new("usr/share/bash-completion/x")));
    }
}
