//! The initramfs: a deterministic `newc` cpio archive holding `racklet-init`
//! as `/init`, the kernel modules it loads, and the list of those modules in
//! load order (`/etc/racklet-init/modules`). Every entry is owned by root with
//! mtime SOURCE_DATE_EPOCH; entries are sorted, inode numbers sequential.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{BuildError, Result};

pub const INIT_PATH: &str = "init";
pub const MODULE_LIST_PATH: &str = "etc/racklet-init/modules";
const CPIO_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const DIRECTORIES: [&str; 5] = ["dev", "proc", "sys", "sysroot", "run"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Directory,
    File { contents: Vec<u8>, mode: u32 },
}

/// An in-memory archive under construction.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn add_file(&mut self, path: &str, contents: Vec<u8>, mode: u32) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = Path::new(&path).parent();
        while let Some(directory) = parent {
            if directory.as_os_str().is_empty() {
                break;
            }
            self.entries
                .insert(directory.to_string_lossy().into_owned(), Entry::Directory);
            parent = directory.parent();
        }
        self.entries.insert(path, Entry::File { contents, mode });
    }

    pub fn add_directory(&mut self, path: &str) {
        self.entries
            .insert(path.trim_start_matches('/').to_string(), Entry::Directory);
    }

    /// Serialize as `newc`.
    pub fn write<W: Write>(&self, out: &mut W, mtime: u64) -> std::io::Result<()> {
        for (inode, (path, entry)) in (1u32..).zip(self.entries.iter()) {
            let (mode, contents, nlink): (u32, &[u8], u32) = match entry {
                Entry::Directory => (0o040755, &[], 2),
                Entry::File { contents, mode } => (0o100000 | mode, contents, 1),
            };
            write_header(out, inode, mode, nlink, mtime, contents.len() as u32, path)?;
            out.write_all(contents)?;
            pad(out, contents.len())?;
        }
        write_header(out, 0, 0, 1, 0, 0, TRAILER)?;
        Ok(())
    }
}

fn write_header<W: Write>(
    out: &mut W,
    inode: u32,
    mode: u32,
    nlink: u32,
    mtime: u64,
    size: u32,
    name: &str,
) -> std::io::Result<()> {
    let name_size = name.len() + 1;
    let fields = [
        inode,
        mode,
        0,
        0,
        nlink,
        mtime as u32,
        size,
        0,
        0,
        0,
        0,
        name_size as u32,
        0,
    ];
    let mut header = String::from(CPIO_MAGIC);
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, header.len() + name_size)
}

fn pad<W: Write>(out: &mut W, length: usize) -> std::io::Result<()> {
    let padding = (4 - length % 4) % 4;
    out.write_all(&[0u8; 3][..padding])
}

/// Read a module file, decompressing `.ko.xz`/`.ko.zst` so the init can load it with finit_module.
fn read_module(path: &Path) -> Result<(Vec<u8>, String)> {
    let name = path.to_string_lossy().into_owned();
    let mut contents = Vec::new();
    let file = std::fs::File::open(path).map_err(BuildError::io(path))?;
    if let Some(stem) = name.strip_suffix(".xz") {
        xz2::read::XzDecoder::new(file)
            .read_to_end(&mut contents)
            .map_err(BuildError::io(path))?;
        Ok((contents, stem.to_string()))
    } else if let Some(stem) = name.strip_suffix(".zst") {
        zstd::stream::read::Decoder::new(file)
            .map_err(BuildError::io(path))?
            .read_to_end(&mut contents)
            .map_err(BuildError::io(path))?;
        Ok((contents, stem.to_string()))
    } else {
        let mut file = file;
        file.read_to_end(&mut contents)
            .map_err(BuildError::io(path))?;
        Ok((contents, name))
    }
}

/// Build the initramfs: `init` binary, modules (paths relative to
/// `<root>/usr/lib/modules/<version>`, in load order) and the module list.
pub fn build(
    init_binary: &Path,
    root: &Path,
    kernel_version: &str,
    modules_in_order: &[String],
    source_date_epoch: u64,
) -> Result<Vec<u8>> {
    let mut archive = Archive::default();
    for directory in DIRECTORIES {
        archive.add_directory(directory);
    }
    let init = std::fs::read(init_binary).map_err(|error| BuildError::Package {
        what: "racklet-init".into(),
        message: format!(
            "{}: {error}; expected the static init built by `make` (cargo build -p racklet-init)",
            init_binary.display()
        ),
    })?;
    archive.add_file(INIT_PATH, init, 0o755);
    let modules_dir = root.join(crate::compose::MODULES_DIR).join(kernel_version);
    let mut list = String::new();
    for module in modules_in_order {
        let (contents, path) = read_module(&modules_dir.join(module))?;
        let relative = Path::new(&path)
            .strip_prefix(root)
            .map_err(|_| BuildError::Other(format!("{path} is outside the root")))?
            .to_string_lossy()
            .into_owned();
        list.push('/');
        list.push_str(&relative);
        list.push('\n');
        archive.add_file(&relative, contents, 0o644);
    }
    archive.add_file(MODULE_LIST_PATH, list.into_bytes(), 0o644);
    let mut bytes = Vec::new();
    archive
        .write(&mut bytes, source_date_epoch)
        .map_err(BuildError::io("initramfs"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_parents_first_and_is_deterministic() {
        let mut archive = Archive::default();
        archive.add_file("/etc/racklet-init/modules", b"x\n".to_vec(), 0o644);
        archive.add_file("init", vec![1, 2, 3], 0o755);
        let mut first = Vec::new();
        archive.write(&mut first, 42).unwrap();
        let mut second = Vec::new();
        archive.write(&mut second, 42).unwrap();
        assert_eq!(first, second);
        let text = String::from_utf8_lossy(&first);
        let etc = text.find("etc\0").unwrap();
        let nested = text.find("etc/racklet-init\0").unwrap();
        let file = text.find("etc/racklet-init/modules\0").unwrap();
        assert!(etc < nested && nested < file);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(first.len() % 4, 0);
    }

    #[test]
    fn cpio_tool_reads_our_archive() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("the `cpio` tool is needed for this test: apt-get install cpio");
        }
        let mut archive = Archive::default();
        archive.add_file("init", b"#!/bin/sh\n".to_vec(), 0o755);
        archive.add_file("lib/modules/x/a.ko", vec![0u8; 5], 0o644);
        let mut bytes = Vec::new();
        archive.write(&mut bytes, 0).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        let listing = String::from_utf8_lossy(&output.stdout);
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("lib/modules/x/a.ko"), "{listing}");
    }
}
