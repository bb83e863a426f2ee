//! Cross-checks `os_format::verity` against cryptsetup's `veritysetup`:
//! for several data sizes and salts, the hash device we write must be
//! byte-identical to what `veritysetup format` writes, our root hash must be
//! the one it prints, `veritysetup verify` must accept our tree, and both
//! verifiers must reject a flipped data byte.
//!
//! Requires `veritysetup` (Debian/Ubuntu package `cryptsetup-bin`); the test
//! fails rather than skips when it is missing. Only user-space commands are
//! used (`format`, `verify`), so no device-mapper is needed.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use os_format::verity::{self, RootHash, VerityError, VERITY_BLOCK_SIZE};

/// Hash-device UUID used for every case (canonical byte order).
const TEST_UUID: [u8; 16] = [
    0x5a, 0x1e, 0x7c, 0x3b, 0x90, 0x42, 0x4d, 0x1f, 0xa6, 0x0e, 0x2b, 0xc4, 0x71, 0x88, 0x39, 0xd5,
];
/// Where to look for `veritysetup` besides `$PATH` (it lives in sbin).
const EXTRA_TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin"];
/// Line prefix of the root hash in `veritysetup format` output.
const ROOT_HASH_LINE_PREFIX: &str = "Root hash:";

/// One cross-check: data size and salt.
struct Case {
    data_blocks: u64,
    salt: Vec<u8>,
}

/// Deterministic pseudo-random bytes (xorshift64), so failures reproduce.
fn pseudo_random_data(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// The 8-4-4-4-12 form `veritysetup --uuid` expects.
fn canonical_uuid(uuid: &[u8; 16]) -> String {
    let hex = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Path of `veritysetup`, or a failing test that says what to install.
fn veritysetup() -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("veritysetup"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("veritysetup not found in $PATH or {EXTRA_TOOL_DIRS:?}: install cryptsetup-bin")
        })
}

fn run(tool: &Path, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("could not run {} {args:?}: {err}", tool.display()))
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Builds with our code, cross-checks with veritysetup, then corrupts a byte.
fn cross_check(tool: &Path, case: &Case, seed: u64) {
    let label = format!("{} blocks, {}-byte salt", case.data_blocks, case.salt.len());
    let dir = tempfile::tempdir().expect("temp dir");
    let data_path = dir.path().join("data");
    let our_hash_path = dir.path().join("hash-ours");
    let their_hash_path = dir.path().join("hash-veritysetup");
    let data_size = case.data_blocks * VERITY_BLOCK_SIZE;
    let data = pseudo_random_data(data_size as usize, seed);
    fs::write(&data_path, &data).expect("write data");

    // Ours.
    let mut hash_out = BufWriter::new(File::create(&our_hash_path).expect("create hash file"));
    let tree = verity::build_hash_tree(
        File::open(&data_path).expect("open data"),
        data_size,
        &case.salt,
        TEST_UUID,
        &mut hash_out,
    )
    .unwrap_or_else(|err| panic!("{label}: build_hash_tree: {err}"));
    drop(hash_out);
    let ours = fs::read(&our_hash_path).expect("read our hash device");
    assert_eq!(ours.len() as u64, tree.hash_device_size_bytes, "{label}");
    assert_eq!(
        tree.hash_device_size_bytes,
        verity::hash_device_size(data_size),
        "{label}"
    );
    let root_hex = verity::root_hash_to_hex(&tree.root_hash);

    // veritysetup accepts our tree.
    let verify_ours = run(
        tool,
        &[
            "verify",
            path_str(&data_path),
            path_str(&our_hash_path),
            &root_hex,
        ],
    );
    assert!(
        verify_ours.status.success(),
        "{label}: veritysetup verify rejected our tree: {}",
        describe(&verify_ours)
    );

    // veritysetup writes the same bytes and prints the same root.
    let salt_arg = if case.salt.is_empty() {
        "-".to_string()
    } else {
        hex::encode(&case.salt)
    };
    let format_output = run(
        tool,
        &[
            "format",
            &format!("--salt={salt_arg}"),
            &format!("--uuid={}", canonical_uuid(&TEST_UUID)),
            "--data-block-size=4096",
            "--hash-block-size=4096",
            path_str(&data_path),
            path_str(&their_hash_path),
        ],
    );
    assert!(
        format_output.status.success(),
        "{label}: veritysetup format failed: {}",
        describe(&format_output)
    );
    let stdout = String::from_utf8_lossy(&format_output.stdout);
    let their_root_hex = stdout
        .lines()
        .find_map(|line| line.strip_prefix(ROOT_HASH_LINE_PREFIX))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{label}: no {ROOT_HASH_LINE_PREFIX:?} line in:\n{stdout}"));
    assert_eq!(their_root_hex, root_hex, "{label}: root hash");
    let theirs = fs::read(&their_hash_path).expect("read veritysetup hash device");
    assert_eq!(ours.len(), theirs.len(), "{label}: hash device length");
    if let Some(first_difference) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("{label}: hash devices differ first at byte offset {first_difference}");
    }

    // Our verifier accepts both, and recomputing gives the same root.
    let root: RootHash = verity::root_hash_from_hex(their_root_hex).expect("root hex");
    for hash_path in [&our_hash_path, &their_hash_path] {
        let superblock = verity::verify(
            File::open(&data_path).expect("open data"),
            File::open(hash_path).expect("open hash"),
            &root,
        )
        .unwrap_or_else(|err| panic!("{label}: our verify of {}: {err}", hash_path.display()));
        assert_eq!(superblock, tree.superblock, "{label}");
    }
    assert_eq!(
        verity::compute_root_hash(&data[..], data_size, &case.salt).expect("compute root"),
        root,
        "{label}"
    );

    // Flip one byte of the data: both verifiers must reject it.
    let corrupt_block = case.data_blocks / 2;
    let mut corrupt_data = data;
    corrupt_data[(corrupt_block * VERITY_BLOCK_SIZE + 123) as usize] ^= 0x20;
    fs::write(&data_path, &corrupt_data).expect("write corrupt data");
    let verify_corrupt = run(
        tool,
        &[
            "verify",
            path_str(&data_path),
            path_str(&our_hash_path),
            &root_hex,
        ],
    );
    assert!(
        !verify_corrupt.status.success(),
        "{label}: veritysetup verify accepted corrupt data: {}",
        describe(&verify_corrupt)
    );
    let err = verity::verify(
        File::open(&data_path).expect("open data"),
        File::open(&our_hash_path).expect("open hash"),
        &root,
    )
    .expect_err("our verify accepted corrupt data");
    if case.data_blocks == 1 {
        // No tree: the root hash is the data block's digest.
        assert!(
            matches!(err, VerityError::RootHashMismatch { .. }),
            "{label}: {err}"
        );
    } else {
        assert!(
            matches!(err, VerityError::CorruptDataBlock { block } if block == corrupt_block),
            "{label}: expected data block {corrupt_block} corrupt, got: {err}"
        );
    }
}

#[test]
fn hash_trees_match_veritysetup_byte_for_byte() {
    let tool = veritysetup();
    let salt_32: Vec<u8> = verity::salt_from_content_digest(&[0x42; 32]);
    let cases = [
        Case {
            data_blocks: 1,
            salt: salt_32.clone(),
        },
        Case {
            data_blocks: 1,
            salt: Vec::new(),
        },
        Case {
            data_blocks: 2,
            salt: vec![0xde, 0xad, 0xbe],
        },
        Case {
            data_blocks: 127,
            salt: salt_32.clone(),
        },
        Case {
            data_blocks: 128,
            salt: salt_32.clone(),
        },
        Case {
            data_blocks: 129,
            salt: salt_32.clone(),
        },
        Case {
            data_blocks: 129,
            salt: Vec::new(),
        },
        Case {
            data_blocks: 1000,
            salt: vec![0x5a; 256],
        },
        Case {
            data_blocks: 128 * 128,
            salt: salt_32.clone(),
        },
        Case {
            data_blocks: 128 * 128 + 1,
            salt: salt_32,
        },
    ];
    for (seed, case) in cases.iter().enumerate() {
        cross_check(&tool, case, seed as u64 + 1);
    }
}
