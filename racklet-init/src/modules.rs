//! Loading the kernel modules the image builder put into the initramfs.
//!
//! The builder writes [`MODULE_LIST_PATH`]: one absolute path of a plain
//! (uncompressed) `.ko` file per line, in dependency order. Empty lines and
//! lines starting with `#` are ignored. `/init` loads them in that order with
//! `finit_module(2)`; there is no `modprobe`, no `modules.dep` lookup.

use std::ffi::CStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::InitError;

/// The module list inside the initramfs.
pub(crate) const MODULE_LIST_PATH: &str = "/etc/racklet-init/modules";
/// File name suffix of a plain kernel module.
const MODULE_SUFFIX: &str = ".ko";
/// Suffixes of compressed modules, which the kernel we ship cannot load from a file.
const COMPRESSED_MODULE_SUFFIXES: [&str; 3] = [".ko.xz", ".ko.zst", ".ko.gz"];
/// `finit_module` parameters: none.
const NO_MODULE_PARAMETERS: &CStr = c"";
/// `finit_module` flags: none (no `MODULE_INIT_IGNORE_*`, no in-kernel
/// decompression).
const NO_MODULE_INIT_FLAGS: i32 = 0;

/// What happened to one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModuleOutcome {
    /// The kernel loaded it.
    Loaded,
    /// It was already loaded (`EEXIST`).
    AlreadyLoaded,
    /// Its init refused this machine (`ENODEV`), e.g. a CPU-specific crypto
    /// driver on a CPU without the instructions. Not fatal: if something
    /// needed it, a later module or the root mount fails and says so.
    NotForThisMachine,
}

/// Counts of what [`load_listed_modules`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ModuleSummary {
    /// Modules the kernel loaded.
    pub loaded: usize,
    /// Modules that were already loaded.
    pub already_loaded: usize,
    /// Modules whose init returned `ENODEV`.
    pub not_for_this_machine: Vec<PathBuf>,
}

/// Parse the module list: absolute paths of `.ko` files, in order.
pub(crate) fn parse_module_list(text: &str, list_path: &Path) -> Result<Vec<PathBuf>, InitError> {
    let mut modules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let bad_line = |reason: String| InitError::ModuleList {
            path: list_path.to_path_buf(),
            line: index + 1,
            reason,
        };
        if !entry.starts_with('/') {
            return Err(bad_line(format!(
                "expected an absolute path inside the initramfs, found {entry:?}"
            )));
        }
        if COMPRESSED_MODULE_SUFFIXES
            .iter()
            .any(|suffix| entry.ends_with(suffix))
        {
            return Err(bad_line(format!(
                "{entry} is compressed; the image builder must ship plain {MODULE_SUFFIX} files"
            )));
        }
        if !entry.ends_with(MODULE_SUFFIX) {
            return Err(bad_line(format!(
                "expected a path ending in {MODULE_SUFFIX}, found {entry:?}"
            )));
        }
        modules.push(PathBuf::from(entry));
    }
    Ok(modules)
}

/// Load one module file with `finit_module(2)`.
pub(crate) fn load_module(path: &Path) -> Result<ModuleOutcome, InitError> {
    let module = File::open(path).map_err(|source| InitError::ModuleMissing {
        path: path.to_path_buf(),
        source,
    })?;
    match rustix::system::finit_module(&module, NO_MODULE_PARAMETERS, NO_MODULE_INIT_FLAGS) {
        Ok(()) => Ok(ModuleOutcome::Loaded),
        Err(Errno::EXIST) => Ok(ModuleOutcome::AlreadyLoaded),
        Err(Errno::NODEV) => Ok(ModuleOutcome::NotForThisMachine),
        Err(source) => Err(InitError::ModuleLoad {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Read the module list at `list_path` and load every module in it, in order.
/// The first missing or failing module is fatal.
pub(crate) fn load_listed_modules(list_path: &Path) -> Result<ModuleSummary, InitError> {
    let text = fs::read_to_string(list_path).map_err(|source| InitError::Read {
        path: list_path.to_path_buf(),
        source,
    })?;
    let mut summary = ModuleSummary::default();
    for module in parse_module_list(&text, list_path)? {
        match load_module(&module)? {
            ModuleOutcome::Loaded => summary.loaded += 1,
            ModuleOutcome::AlreadyLoaded => summary.already_loaded += 1,
            ModuleOutcome::NotForThisMachine => summary.not_for_this_machine.push(module),
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "/etc/racklet-init/modules";

    #[test]
    fn list_keeps_order_and_skips_blanks_and_comments() {
        let text = "\
# dm-verity and its dependencies
/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/md/dm-mod.ko

  /lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/md/dm-bufio.ko  
/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/md/dm-verity.ko
";
        let modules = parse_module_list(text, Path::new(LIST)).unwrap();
        let names: Vec<_> = modules
            .iter()
            .map(|path| path.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["dm-mod.ko", "dm-bufio.ko", "dm-verity.ko"]);
        assert!(parse_module_list("", Path::new(LIST)).unwrap().is_empty());
    }

    #[test]
    fn list_errors_name_the_line() {
        let error = parse_module_list("/a.ko\nkernel/b.ko\n", Path::new(LIST)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "module list /etc/racklet-init/modules, line 2: expected an absolute path inside \
             the initramfs, found \"kernel/b.ko\""
        );
        let error = parse_module_list("/lib/erofs.ko.xz", Path::new(LIST)).unwrap_err();
        assert!(error.to_string().contains("compressed"), "{error}");
        let error = parse_module_list("/lib/erofs", Path::new(LIST)).unwrap_err();
        assert!(error.to_string().contains("ending in .ko"), "{error}");
    }

    #[test]
    fn a_missing_module_is_named() {
        let error = load_module(Path::new("/nonexistent/racklet/dm-verity.ko")).unwrap_err();
        assert!(matches!(error, InitError::ModuleMissing { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("/nonexistent/racklet/dm-verity.ko"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_list_is_fatal() {
        let error = load_listed_modules(Path::new("/nonexistent/racklet/modules")).unwrap_err();
        assert!(matches!(error, InitError::Read { .. }), "{error}");
    }
}
