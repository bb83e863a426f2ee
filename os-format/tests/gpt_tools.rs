//! Checks the GPT writer and reader against the standard Linux partitioning tools:
//! `sgdisk` (package `gdisk`) and `sfdisk` (package `fdisk`). Both must be on PATH;
//! the tests fail, rather than skip, when they are missing.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output};

use os_format::gpt::{
    GptDisk, GptSource, Guid, PartitionSpec, ATTRIBUTE_GROWFS, ATTRIBUTE_READ_ONLY,
    ATTRIBUTE_REQUIRED, SECTOR_SIZE,
};

/// One mebibyte.
const MIB: u64 = 1024 * 1024;
/// Size of the sparse test disk.
const DISK_SIZE_BYTES: u64 = 64 * MIB;
/// EFI System Partition type.
const ESP_TYPE: Guid = Guid::parse_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// Discoverable Partitions Specification: root partition (x86-64).
const ROOT_X86_64_TYPE: Guid = Guid::parse_const("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// Discoverable Partitions Specification: root verity partition (x86-64).
const ROOT_VERITY_X86_64_TYPE: Guid = Guid::parse_const("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
/// Discoverable Partitions Specification: variable data partition (/var).
const VAR_TYPE: Guid = Guid::parse_const("4d21b016-b534-45c2-a9fb-5c16e091fd2d");
/// Generic Linux file system data (used for the sgdisk-written table).
const LINUX_DATA_TYPE: Guid = Guid::parse_const("0fc63daf-8483-4772-8e79-3d69d8477de4");

/// Runs a partitioning tool, failing with installation advice if it is missing.
fn run_tool(program: &str, package: &str, arguments: &[&str], disk: &Path) -> Output {
    let output = Command::new(program)
        .args(arguments)
        .arg(disk)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "could not run `{program}` ({error}); expected it on PATH: install the \
                 `{package}` package (e.g. `apt-get install {package}`)"
            )
        });
    assert!(
        output.status.success(),
        "`{program} {}` failed with {}:\nstdout:\n{}\nstderr:\n{}",
        arguments.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The six partitions of a Racklet disk, the last one filling the disk.
fn racklet_specs() -> Vec<PartitionSpec> {
    let spec =
        |name: &str, type_guid: Guid, size_bytes: Option<u64>, attributes: u64| PartitionSpec {
            name: name.to_owned(),
            type_guid,
            unique_guid: Guid::derive(format!("gpt_tools test/{name}").as_bytes()),
            size_bytes,
            attributes,
        };
    let read_only = ATTRIBUTE_READ_ONLY | ATTRIBUTE_REQUIRED;
    vec![
        spec("esp", ESP_TYPE, Some(8 * MIB), ATTRIBUTE_REQUIRED),
        spec("root-a", ROOT_X86_64_TYPE, Some(16 * MIB), read_only),
        spec("verity-a", ROOT_VERITY_X86_64_TYPE, Some(MIB), read_only),
        spec("root-b", ROOT_X86_64_TYPE, Some(16 * MIB), read_only),
        spec(
            "verity-b",
            ROOT_VERITY_X86_64_TYPE,
            Some(MIB / 2),
            read_only,
        ),
        spec("data", VAR_TYPE, None, ATTRIBUTE_GROWFS),
    ]
}

/// A sparse temporary file of `size_bytes`.
fn sparse_disk(size_bytes: u64) -> tempfile::NamedTempFile {
    let disk = tempfile::NamedTempFile::new().expect("create temporary disk image");
    disk.as_file()
        .set_len(size_bytes)
        .expect("size temporary disk image");
    disk
}

/// Reads a string field of an `sfdisk --json` partition object.
fn json_str<'a>(partition: &'a serde_json::Value, field: &str) -> &'a str {
    partition[field]
        .as_str()
        .unwrap_or_else(|| panic!("sfdisk partition lacks string field {field:?}: {partition}"))
}

/// Reads an integer field of an `sfdisk --json` object.
fn json_u64(object: &serde_json::Value, field: &str) -> u64 {
    object[field]
        .as_u64()
        .unwrap_or_else(|| panic!("sfdisk output lacks integer field {field:?}: {object}"))
}

#[test]
fn gpt_written_here_is_accepted_by_sgdisk_and_sfdisk() {
    let mut disk = sparse_disk(DISK_SIZE_BYTES);
    let disk_guid = Guid::derive(b"gpt_tools test/disk");
    let gpt = GptDisk::plan(disk_guid, DISK_SIZE_BYTES, &racklet_specs()).expect("plan");
    gpt.write(disk.as_file_mut()).expect("write GPT");
    disk.as_file_mut().flush().expect("flush disk image");

    let verify = run_tool("sgdisk", "gdisk", &["-v"], disk.path());
    let verify_text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify_text.contains("No problems found"),
        "expected `sgdisk -v` to report \"No problems found\", found:\n{verify_text}"
    );

    let dump = run_tool("sfdisk", "fdisk", &["--json"], disk.path());
    let json: serde_json::Value =
        serde_json::from_slice(&dump.stdout).expect("sfdisk --json prints JSON");
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt", "sfdisk output: {json}");
    assert_eq!(
        Guid::parse(json_str(table, "id")).expect("disk GUID from sfdisk"),
        disk_guid
    );
    assert_eq!(json_u64(table, "firstlba"), gpt.first_usable_lba());
    assert_eq!(json_u64(table, "lastlba"), gpt.last_usable_lba());
    if let Some(sector_size) = table["sectorsize"].as_u64() {
        assert_eq!(sector_size, SECTOR_SIZE);
    }

    let listed = table["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("sfdisk output lacks a partitions array: {json}"));
    assert_eq!(listed.len(), gpt.partitions.len(), "sfdisk output: {json}");
    for (planned, found) in gpt.partitions.iter().zip(listed) {
        assert_eq!(json_u64(found, "start"), planned.first_lba, "{found}");
        assert_eq!(
            json_u64(found, "size") * SECTOR_SIZE,
            planned.size_bytes(),
            "{found}"
        );
        assert_eq!(
            Guid::parse(json_str(found, "type")).expect("type GUID from sfdisk"),
            planned.type_guid
        );
        assert_eq!(
            Guid::parse(json_str(found, "uuid")).expect("unique GUID from sfdisk"),
            planned.unique_guid
        );
        assert_eq!(json_str(found, "name"), planned.name);
    }

    // The last partition filled the disk up to the last whole MiB.
    let data = gpt.find_by_name("data").expect("data partition").1;
    assert_eq!(data.offset_bytes(), 43 * MIB);
    assert_eq!(data.size_bytes(), 20 * MIB);

    let read_back = GptDisk::read(disk.as_file_mut(), DISK_SIZE_BYTES).expect("read GPT back");
    assert_eq!(read_back, gpt);
}

#[test]
fn gpt_written_by_sgdisk_is_read_and_rewritten() {
    let disk = sparse_disk(DISK_SIZE_BYTES);
    let disk_guid = Guid::derive(b"gpt_tools test/sgdisk disk");
    let esp_guid = Guid::derive(b"gpt_tools test/sgdisk esp");
    let data_guid = Guid::derive(b"gpt_tools test/sgdisk data");
    run_tool(
        "sgdisk",
        "gdisk",
        &[
            &format!("--disk-guid={disk_guid}"),
            "--new=1:2048:+4M",
            "--typecode=1:ef00",
            "--change-name=1:esp",
            &format!("--partition-guid=1:{esp_guid}"),
            "--new=3:0:0",
            "--typecode=3:8300",
            "--change-name=3:data",
            &format!("--partition-guid=3:{data_guid}"),
            "--attributes=3:set:60",
        ],
        disk.path(),
    );

    let mut file = File::open(disk.path()).expect("open disk image");
    let (gpt, source) =
        GptDisk::read_with_report(&mut file, DISK_SIZE_BYTES).expect("read sgdisk's GPT");
    assert_eq!(source, GptSource::Primary);
    assert_eq!(gpt.disk_guid, disk_guid);
    let (number, esp) = gpt.find_by_unique_guid(&esp_guid).expect("esp by GUID");
    assert_eq!(number, 1);
    assert_eq!(esp.name, "esp");
    assert_eq!(esp.type_guid, ESP_TYPE);
    assert_eq!(esp.first_lba, 2048);
    assert_eq!(esp.size_bytes(), 4 * MIB);
    let (number, data) = gpt.find_by_name("data").expect("data by name");
    assert_eq!(number, 3, "partition 2 is an unused slot");
    assert_eq!(data.unique_guid, data_guid);
    assert_eq!(data.type_guid, LINUX_DATA_TYPE);
    assert_eq!(data.attributes, ATTRIBUTE_READ_ONLY);
    assert!(gpt.partitions[1].is_unused());

    // Rewriting what was read keeps sgdisk happy and round-trips.
    let mut writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk.path())
        .expect("open disk image for writing");
    gpt.write(&mut writable).expect("rewrite GPT");
    let verify = run_tool("sgdisk", "gdisk", &["-v"], disk.path());
    let verify_text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify_text.contains("No problems found"),
        "expected `sgdisk -v` to report \"No problems found\", found:\n{verify_text}"
    );
    writable.seek(SeekFrom::Start(0)).expect("rewind");
    assert_eq!(
        GptDisk::read(&mut writable, DISK_SIZE_BYTES).expect("read rewritten GPT"),
        gpt
    );
}
