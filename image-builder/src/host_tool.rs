//! Running the host tools the build uses (mkfs.erofs, mkfs.ext4, mkfs.fat,
//! mtools, objcopy, mkimage, ...): a missing tool names its Debian package, a
//! failing one its command line and what it printed.

use std::process::{Command, Output};

use crate::error::{BuildError, Result};

/// Run `command` (whose program is `tool`, from Debian package `package`) to
/// completion; an error unless it exits successfully.
pub fn run(command: &mut Command, tool: &str, package: &str) -> Result<Output> {
    let output = command.output().map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            BuildError::HostTool {
                tool: tool.into(),
                package: package.into(),
            }
        } else {
            BuildError::io(tool)(error)
        }
    })?;
    if !output.status.success() {
        return Err(BuildError::Command {
            command: format!("{command:?}"),
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let error = run(
            &mut Command::new("racklet-no-such-tool"),
            "racklet-no-such-tool",
            "racklet-package",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("apt-get install racklet-package"), "{error}");
    }

    #[test]
    fn failure_shows_what_the_tool_printed() {
        let error = run(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            "sh",
            "dash",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("broken") && error.contains("3"), "{error}");
    }
}
