//! The kernel: its config checked against `kernel-config/<variant>.toml`, and
//! the closure of the modules the initramfs needs, from `modules.dep`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{BuildError, Result};

pub const KERNEL_CONFIG_DIR: &str = "kernel-config";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Requirement {
    #[serde(rename = "built-in")]
    BuiltIn,
    #[serde(rename = "module")]
    Module,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequirementsFile {
    options: BTreeMap<String, Requirement>,
}

pub fn requirements_path(project_root: &Path, variant: &str) -> PathBuf {
    project_root
        .join(KERNEL_CONFIG_DIR)
        .join(format!("{variant}.toml"))
}

pub fn load_requirements(path: &Path) -> Result<BTreeMap<String, Requirement>> {
    let text = std::fs::read_to_string(path).map_err(BuildError::io(path))?;
    let file: RequirementsFile =
        toml::from_str(&text).map_err(|error| crate::error::toml_error(path, &text, &error))?;
    for option in file.options.keys() {
        if !option.starts_with("CONFIG_") {
            return Err(BuildError::ConfigKey {
                file: path.to_path_buf(),
                key: format!("options.{option}"),
                message: "expected a kernel option name starting with CONFIG_".into(),
            });
        }
    }
    Ok(file.options)
}

/// Parse a kernel `.config`: `CONFIG_X=y|m|"..."`; `# CONFIG_X is not set` lines are absent.
pub fn parse_kernel_config(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|line| line.starts_with("CONFIG_"))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// Every requirement the config does not meet, as `CONFIG_X (want built-in, found m)`.
pub fn unmet_requirements(
    requirements: &BTreeMap<String, Requirement>,
    config: &HashMap<String, String>,
) -> Vec<String> {
    requirements
        .iter()
        .filter_map(|(option, requirement)| {
            let found = config.get(option).map(String::as_str);
            let ok = match requirement {
                Requirement::BuiltIn => found == Some("y"),
                Requirement::Module => matches!(found, Some("y") | Some("m")),
            };
            (!ok).then(|| {
                let want = match requirement {
                    Requirement::BuiltIn => "built-in (=y)",
                    Requirement::Module => "module or built-in (=m or =y)",
                };
                format!(
                    "{option} (want {want}, found {})",
                    found.unwrap_or("not set")
                )
            })
        })
        .collect()
}

/// Check a kernel package's `/boot/config-<version>` before anything is built.
/// Returns false for a package without one (the metapackage).
pub fn check_package_config(
    requirements_file: &Path,
    kernel_deb: &Path,
    package: &str,
) -> Result<bool> {
    let found =
        crate::unpack::read_file_from_deb(kernel_deb, |path| path.starts_with("boot/config-"))
            .map_err(|error| BuildError::Package {
                what: package.to_string(),
                message: error.to_string(),
            })?;
    let Some((path, contents)) = found else {
        return Ok(false);
    };
    let version = path.trim_start_matches("boot/config-").to_string();
    check_config_text(
        requirements_file,
        &String::from_utf8_lossy(&contents),
        &version,
    )?;
    Ok(true)
}

pub fn check_config_text(requirements_file: &Path, text: &str, kernel_version: &str) -> Result<()> {
    let requirements = load_requirements(requirements_file)?;
    let unmet = unmet_requirements(&requirements, &parse_kernel_config(text));
    if unmet.is_empty() {
        Ok(())
    } else {
        Err(BuildError::KernelConfig {
            file: requirements_file.to_path_buf(),
            kernel_version: kernel_version.to_string(),
            missing: unmet.join(", "),
        })
    }
}

/// Module names treat `-` and `_` alike.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    module_key(stem)
}

/// modules.dep's lines as (module path, the paths of the modules it needs).
fn modules_dep_entries(modules_dep: &str) -> impl Iterator<Item = (&str, Vec<&str>)> {
    modules_dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
}

/// The modules to load, dependencies first, as paths relative to the modules
/// directory. Built-in modules are skipped; an unknown module is an error.
pub fn module_closure(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[String],
) -> Result<Vec<String>> {
    let dependencies: HashMap<String, (String, Vec<String>)> = modules_dep_entries(modules_dep)
        .map(|(module, deps)| {
            (
                module_name_of(module),
                (
                    module.to_string(),
                    deps.into_iter().map(str::to_string).collect(),
                ),
            )
        })
        .collect();
    let builtin: HashSet<String> = modules_builtin.lines().map(module_name_of).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        key: &str,
        dependencies: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(key.to_string()) {
            return;
        }
        let (path, deps) = &dependencies[key];
        // modules.dep lists a module's dependencies so that the last must load first.
        for dep in deps.iter().rev() {
            visit(&module_name_of(dep), dependencies, seen, order);
        }
        order.push(path.clone());
    }
    for name in wanted {
        let key = module_key(name);
        if dependencies.contains_key(&key) {
            visit(&key, &dependencies, &mut seen, &mut order);
        } else if !builtin.contains(&key) {
            return Err(BuildError::Other(format!(
                "initramfs module `{name}` is neither in the kernel's modules.dep nor built in; expected a module name such as dm-verity"
            )));
        }
    }
    Ok(order)
}

/// The modules a variant leaves out of its image (`kernel.omit_modules`):
/// every module under one of `directories` (paths relative to the kernel's
/// modules directory, such as `kernel/sound`) and every module that needs one
/// of those (modules.dep lists each module's dependencies, transitively), so
/// that no module left in the image fails to load for a missing symbol.
/// Returns the paths relative to the modules directory, sorted. A directory
/// that holds no module, and an initramfs module that would go, are errors
/// naming `variant_file` and the key.
pub fn omitted_modules(
    modules_dep: &str,
    directories: &[String],
    initramfs_modules: &[String],
    variant_file: &Path,
) -> Result<Vec<String>> {
    let dependencies: Vec<(&str, Vec<&str>)> = modules_dep_entries(modules_dep).collect();
    let mut omitted: BTreeSet<String> = BTreeSet::new();
    for directory in directories {
        let prefix = format!("{}/", directory.trim_end_matches('/'));
        let before = omitted.len();
        omitted.extend(
            dependencies
                .iter()
                .filter(|(module, _)| module.starts_with(&prefix))
                .map(|(module, _)| module.to_string()),
        );
        if omitted.len() == before {
            return Err(BuildError::ConfigKey {
                file: variant_file.to_path_buf(),
                key: "kernel.omit_modules".into(),
                message: format!(
                    "`{directory}` holds no module of this kernel; expected a directory of modules.dep such as kernel/sound"
                ),
            });
        }
    }
    // Until nothing changes: a module that needs an omitted one goes too.
    loop {
        let needing: Vec<String> = dependencies
            .iter()
            .filter(|(module, deps)| {
                !omitted.contains(*module) && deps.iter().any(|dep| omitted.contains(*dep))
            })
            .map(|(module, _)| module.to_string())
            .collect();
        if needing.is_empty() {
            break;
        }
        omitted.extend(needing);
    }
    let omitted_names: HashSet<String> = omitted.iter().map(|path| module_name_of(path)).collect();
    if let Some(name) = initramfs_modules
        .iter()
        .find(|name| omitted_names.contains(&module_key(name)))
    {
        return Err(BuildError::ConfigKey {
            file: variant_file.to_path_buf(),
            key: "kernel.omit_modules".into(),
            message: format!(
                "leaves out `{name}` (or a module it needs), which kernel.initramfs_modules loads to reach the root; expected directories without it"
            ),
        });
    }
    Ok(omitted.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMIT_DEP: &str = "kernel/sound/core/snd.ko:\n\
kernel/sound/pci/snd-hda.ko: kernel/sound/core/snd.ko\n\
kernel/drivers/staging/bcm2835-audio.ko: kernel/sound/core/snd.ko\n\
kernel/drivers/staging/uses-audio.ko: kernel/drivers/staging/bcm2835-audio.ko kernel/sound/core/snd.ko\n\
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko\n\
kernel/drivers/md/dm-bufio.ko:\n";

    #[test]
    fn omitted_modules_take_what_needs_them_along() {
        let omitted = omitted_modules(
            OMIT_DEP,
            &["kernel/sound".to_string()],
            &["dm-verity".to_string()],
            Path::new("variants/rpi4/variant.toml"),
        )
        .unwrap();
        assert_eq!(
            omitted,
            [
                "kernel/drivers/staging/bcm2835-audio.ko",
                "kernel/drivers/staging/uses-audio.ko",
                "kernel/sound/core/snd.ko",
                "kernel/sound/pci/snd-hda.ko",
            ]
        );
        // A trailing slash means the same directory; nothing to omit, nothing taken.
        let omitted = omitted_modules(
            OMIT_DEP,
            &["kernel/drivers/md/".into()],
            &[],
            Path::new("v.toml"),
        )
        .unwrap();
        assert_eq!(
            omitted,
            [
                "kernel/drivers/md/dm-bufio.ko",
                "kernel/drivers/md/dm-verity.ko"
            ]
        );
        assert!(omitted_modules(OMIT_DEP, &[], &[], Path::new("v.toml"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn omitted_modules_refuse_typos_and_initramfs_modules() {
        let file = Path::new("variants/rpi4/variant.toml");
        let error = omitted_modules(OMIT_DEP, &["kernel/sond".into()], &[], file)
            .unwrap_err()
            .to_string();
        assert!(error.contains("variants/rpi4/variant.toml"), "{error}");
        assert!(
            error.contains("kernel.omit_modules")
                && error.contains("`kernel/sond` holds no module"),
            "{error}"
        );
        // A directory is matched whole: `kernel/sound/co` is not `kernel/sound/core`.
        let error = omitted_modules(OMIT_DEP, &["kernel/sound/co".into()], &[], file)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`kernel/sound/co` holds no module"),
            "{error}"
        );
        let error = omitted_modules(
            OMIT_DEP,
            &["kernel/drivers/md".into()],
            &["dm_verity".into()],
            file,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("leaves out `dm_verity`"), "{error}");
    }

    #[test]
    fn config_requirements_name_what_is_missing() {
        let config = parse_kernel_config("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n");
        let mut requirements = BTreeMap::new();
        requirements.insert("CONFIG_A".to_string(), Requirement::BuiltIn);
        requirements.insert("CONFIG_B".to_string(), Requirement::BuiltIn);
        requirements.insert("CONFIG_C".to_string(), Requirement::Module);
        requirements.insert("CONFIG_D".to_string(), Requirement::Module);
        let unmet = unmet_requirements(&requirements, &config);
        assert_eq!(
            unmet,
            vec![
                "CONFIG_B (want built-in (=y), found m)".to_string(),
                "CONFIG_C (want module or built-in (=m or =y), found not set)".to_string(),
                "CONFIG_D (want module or built-in (=m or =y), found not set)".to_string(),
            ]
        );
    }

    #[test]
    fn closure_loads_dependencies_first() {
        let dep = "kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko\n\
                   kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko\n\
                   kernel/drivers/md/dm-mod.ko:\n\
                   kernel/fs/erofs/erofs.ko:\n";
        let order = module_closure(
            dep,
            "kernel/drivers/virtio/virtio_pci.ko\n",
            &["dm_verity".into(), "erofs".into(), "virtio-pci".into()],
        )
        .unwrap();
        assert_eq!(
            order,
            vec![
                "kernel/drivers/md/dm-mod.ko",
                "kernel/drivers/md/dm-bufio.ko",
                "kernel/drivers/md/dm-verity.ko",
                "kernel/fs/erofs/erofs.ko",
            ]
        );
        let error = module_closure(dep, "", &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("`nope`"), "{error}");
    }
}
