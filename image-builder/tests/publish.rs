//! `racklet-image keys|publish|repo` end to end: the real binary against
//! synthetic build directories (random bytes the manifest vouches for, a few
//! KB each) in temporary directories, read back with tough's client over
//! HTTP from 127.0.0.1 or from the file system.
//!
//! Every refused command must exit non-zero, say why (the key words are
//! asserted), and leave the repository directory — and its parent, where the
//! staging copy lives — byte-for-byte as it was.
//!
//! Known publisher bugs (these tests fail until they are fixed; see the
//! comments on each):
//! - `keys_from_another_generate_are_refused`
//! - `concurrent_publishes_never_lose_a_version`

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use os_format::layout::{Arch, Slot};
use os_format::manifest::{
    Artifact, ArtifactKind, BuildManifest, Compression, K3sProvenance, PartitionSizes, VerityInfo,
    BUILD_MANIFEST_SCHEMA, IMAGE_NAME,
};
use os_format::update_manifest::{UpdateManifest, UPDATE_MANIFEST_TARGET};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tough::{
    ExpirationEnforcement, FilesystemTransport, HttpTransport, IntoVec, Repository,
    RepositoryLoader, TargetName,
};

const VARIANT: &str = "qemu-x86_64";

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Assert success and return the JSON on stdout (commands run with --json).
    fn ok(self) -> Value {
        assert!(
            self.success(),
            "`{}` failed ({:?}):\nstdout: {}\nstderr: {}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self.json()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| {
            panic!(
                "`{}`: stdout is not JSON ({error}):\n{}\nstderr: {}",
                self.what, self.stdout, self.stderr
            )
        })
    }

    /// Assert a clear refusal: a non-zero exit (not a crash), one `error:` line
    /// naming every word in `words`, and no panic.
    fn refused(&self, words: &[&str]) {
        assert!(
            !self.success(),
            "`{}` should have failed but succeeded:\nstdout: {}\nstderr: {}",
            self.what,
            self.stdout,
            self.stderr
        );
        assert!(
            self.code.is_some(),
            "`{}` was killed by a signal: {}",
            self.what,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "`{}` panicked: {}",
            self.what,
            self.stderr
        );
        let error_lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|line| line.starts_with("error:") || line.starts_with("  caused by:"))
            .collect();
        assert!(
            !error_lines.is_empty(),
            "`{}`: no `error:` line on stderr: {}",
            self.what,
            self.stderr
        );
        let message = error_lines.join("\n");
        for word in words {
            assert!(
                message.contains(word),
                "`{}`: expected {word:?} in the error message:\n{message}",
                self.what
            );
        }
    }
}

fn racklet<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<String> = args
        .into_iter()
        .map(|arg| arg.as_ref().to_string_lossy().into_owned())
        .collect();
    let output = Command::new(env!("CARGO_BIN_EXE_racklet-image"))
        .args(&args)
        .env("RACKLET_LOG", "warn")
        .env_remove("RACKLET_KEYS")
        .output()
        .expect("racklet-image runs");
    Run {
        what: format!("racklet-image {}", args.join(" ")),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn rfc3339(time: jiff::Timestamp) -> String {
    jiff::Timestamp::from_second(time.as_second())
        .unwrap()
        .to_string()
}

fn hours_from_now(hours: i64) -> jiff::Timestamp {
    jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours)
}

// ---------------------------------------------------------------------------
// Synthetic builds
// ---------------------------------------------------------------------------

/// Bytes that differ on every call (sha256 in counter mode over a unique seed).
fn random_bytes(length: usize) -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}-{}-{}",
        std::time::SystemTime::now(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let mut bytes = Vec::with_capacity(length + 32);
    let mut block = 0u64;
    while bytes.len() < length {
        let mut hasher = Sha256::new();
        hasher.update(seed.as_bytes());
        hasher.update(block.to_le_bytes());
        bytes.extend_from_slice(&hasher.finalize());
        block += 1;
    }
    bytes.truncate(length);
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Build {
    dir: PathBuf,
    manifest: BuildManifest,
}

impl Build {
    fn artifact_path(&self, name: &str) -> PathBuf {
        self.dir.join("update").join(name)
    }

    fn target_names(&self) -> Vec<String> {
        self.manifest
            .artifacts
            .iter()
            .map(|artifact| {
                format!(
                    "{}-{}-{}",
                    self.manifest.variant, self.manifest.version, artifact.name
                )
            })
            .collect()
    }
}

/// A build directory: `manifest.json` (BuildManifest schema 1) and four
/// artifacts of random bytes under `update/`.
fn make_build(dir: &Path, variant: &str, version: &str) -> Build {
    let update = dir.join("update");
    fs::create_dir_all(&update).unwrap();
    let kinds = [
        (
            "root.erofs.zst",
            ArtifactKind::RootFilesystem,
            Compression::Zstd,
        ),
        (
            "verity.img.zst",
            ArtifactKind::VerityHashTree,
            Compression::Zstd,
        ),
        (
            "uki-a.efi",
            ArtifactKind::KernelImage { slot: Slot::A },
            Compression::None,
        ),
        (
            "uki-b.efi",
            ArtifactKind::KernelImage { slot: Slot::B },
            Compression::None,
        ),
    ];
    let artifacts = kinds
        .iter()
        .enumerate()
        .map(|(index, (name, kind, compression))| {
            let bytes = random_bytes(2048 + 1024 * index + index);
            fs::write(update.join(name), &bytes).unwrap();
            // Nothing in publishing decompresses; the uncompressed fields are made up.
            let uncompressed = match compression {
                Compression::Zstd => [bytes.as_slice(), &[0u8; 100]].concat(),
                Compression::None => bytes.clone(),
            };
            Artifact {
                name: name.to_string(),
                kind: *kind,
                compression: *compression,
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                uncompressed_size: uncompressed.len() as u64,
                uncompressed_sha256: sha256_hex(&uncompressed),
            }
        })
        .collect();
    let manifest = BuildManifest {
        schema: BUILD_MANIFEST_SCHEMA,
        image_name: IMAGE_NAME.into(),
        variant: variant.into(),
        arch: Arch::X86_64,
        version: version.into(),
        source_date_epoch: 1_795_000_000,
        kernel_version: "6.1.0-28-cloud-amd64".into(),
        kernel_cmdline: "ro racklet.slot=a".into(),
        verity: VerityInfo {
            root_hash: sha256_hex(version.as_bytes()),
            salt: "11".repeat(32),
            hash_algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 10,
        },
        k3s: K3sProvenance::Absent,
        partitions: PartitionSizes {
            esp: 1,
            root: 2,
            verity: 3,
            data: 4,
        },
        required_units: vec!["containerd.service".into()],
        artifacts,
        outputs: vec![],
        packages: vec![],
    };
    fs::write(dir.join("manifest.json"), manifest.to_json()).unwrap();
    Build {
        dir: dir.to_path_buf(),
        manifest,
    }
}

// ---------------------------------------------------------------------------
// A scratch site: keys, builds and a repository in one temporary directory
// ---------------------------------------------------------------------------

/// Every file (and directory) under a tree: relative path -> sha256 or "dir".
type Snapshot = BTreeMap<String, String>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, dir: &Path, into: &mut Snapshot) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            let kind = fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                into.insert(relative, "dir".into());
                walk(root, &path, into);
            } else if kind.is_symlink() {
                into.insert(
                    relative,
                    format!("-> {}", fs::read_link(&path).unwrap().display()),
                );
            } else {
                into.insert(relative, sha256_hex(&fs::read(&path).unwrap()));
            }
        }
    }
    let mut map = Snapshot::new();
    walk(root, root, &mut map);
    map
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

struct Site {
    _temp: tempfile::TempDir,
    base: PathBuf,
    keys: PathBuf,
    /// The repository's parent: holds only the repository (and, during a
    /// change, its staging copy).
    site: PathBuf,
    repo: PathBuf,
}

static BUILD_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Site {
    fn new() -> Site {
        Site::with_keys(&[])
    }

    /// A site whose keys come from `keys generate --dir <keys> <extra>`.
    fn with_keys(extra: &[&str]) -> Site {
        let temp = tempfile::tempdir().unwrap();
        let base = temp.path().to_path_buf();
        let keys = base.join("keys");
        let site = base.join("site");
        fs::create_dir_all(&site).unwrap();
        let mut args = vec!["--json", "keys", "generate", "--dir", text(&keys)];
        args.extend_from_slice(extra);
        let report = racklet(&args).ok();
        assert_eq!(report["root_version"], 1, "{report}");
        Site {
            _temp: temp,
            base,
            keys,
            repo: site.join("repo"),
            site,
        }
    }

    fn build(&self, version: &str) -> Build {
        self.build_of(VARIANT, version)
    }

    fn build_of(&self, variant: &str, version: &str) -> Build {
        let dir = self.base.join("builds").join(format!(
            "{variant}-{version}-{}",
            BUILD_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        make_build(&dir, variant, version)
    }

    /// `publish --json` with this site's keys; `extra` after the defaults.
    fn publish_with(&self, build: &Build, keys: &Path, extra: &[&str]) -> Run {
        let mut args = vec![
            "--json",
            "publish",
            "--build",
            text(&build.dir),
            "--repo",
            text(&self.repo),
            "--keys",
            text(keys),
        ];
        args.extend_from_slice(extra);
        racklet(&args)
    }

    fn publish(&self, build: &Build, extra: &[&str]) -> Run {
        self.publish_with(build, &self.keys, extra)
    }

    /// A `repo <command> --repo REPO <extra> --json` (the global flag after the subcommand).
    fn repo_command(&self, command: &str, extra: &[&str]) -> Run {
        let mut args = vec!["repo", command, "--repo", text(&self.repo)];
        args.extend_from_slice(extra);
        args.push("--json");
        racklet(&args)
    }

    fn repo_with_keys(&self, command: &str, extra: &[&str]) -> Run {
        let mut args = vec!["--keys", text(&self.keys)];
        args.extend_from_slice(extra);
        self.repo_command(command, &args)
    }

    fn list(&self) -> Value {
        self.repo_command("list", &[]).ok()
    }

    fn validate(&self) -> Value {
        self.repo_command("validate", &[]).ok()
    }

    /// The repository and everything beside it (a leftover staging copy shows up here).
    fn snapshot(&self) -> Snapshot {
        snapshot(&self.site)
    }

    fn assert_unchanged(&self, before: &Snapshot, what: &str) {
        let after = self.snapshot();
        if &after != before {
            let changed: Vec<String> = before
                .keys()
                .chain(after.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|key| before.get(*key) != after.get(*key))
                .map(|key| {
                    format!(
                        "{key}: {:?} -> {:?}",
                        before.get(key).map(String::as_str),
                        after.get(key).map(String::as_str)
                    )
                })
                .collect();
            panic!(
                "{what}: the repository directory changed:\n{}",
                changed.join("\n")
            );
        }
    }

    fn metadata(&self, name: &str) -> Value {
        let path = self.repo.join("metadata").join(name);
        serde_json::from_slice(&fs::read(&path).unwrap())
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    fn first_root(&self) -> Vec<u8> {
        fs::read(self.repo.join("metadata").join("1.root.json")).unwrap()
    }
}

/// The `updates` of a `repo list --json`, by version.
fn listed_updates(listing: &Value) -> BTreeMap<String, Value> {
    listing["updates"]
        .as_array()
        .expect("updates")
        .iter()
        .map(|update| {
            (
                update["version"].as_str().unwrap().to_string(),
                update.clone(),
            )
        })
        .collect()
}

fn role_state<'a>(roles: &'a Value, role: &str) -> &'a Value {
    roles
        .as_array()
        .expect("roles")
        .iter()
        .find(|entry| entry["role"] == role)
        .unwrap_or_else(|| panic!("no role {role} in {roles}"))
}

// ---------------------------------------------------------------------------
// A static file server on 127.0.0.1 and tough's client
// ---------------------------------------------------------------------------

struct Server {
    url: String,
    served: Arc<Mutex<Vec<String>>>,
}

/// Serve `root` over HTTP/1.1 on a free port of 127.0.0.1 until the test
/// process ends. Paths are looked up by name on each request, so a
/// repository swapped in by a later publish is served as it is then.
fn serve(root: &Path) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(Mutex::new(Vec::new()));
    let root = root.to_path_buf();
    let log = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (root, log) = (root.clone(), log.clone());
            std::thread::spawn(move || {
                let _ = answer(stream, &root, &log);
            });
        }
    });
    Server { url, served }
}

fn answer(mut stream: TcpStream, root: &Path, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let relative = path.split('?').next().unwrap_or("").trim_start_matches('/');
    let safe = !relative
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..");
    let body = if method == "GET" && safe {
        fs::read(root.join(relative)).ok()
    } else {
        None
    };
    log.lock().unwrap().push(relative.to_string());
    match body {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)?;
        }
        None => stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    stream.flush()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// tough's client over HTTP, trusting only `root` (expiry enforced).
fn load_http(server: &Server, root: &[u8]) -> Repository {
    let root = root.to_vec();
    block_on(async {
        RepositoryLoader::new(
            &root,
            url::Url::parse(&format!("{}/metadata/", server.url)).unwrap(),
            url::Url::parse(&format!("{}/targets/", server.url)).unwrap(),
        )
        .transport(HttpTransport::default())
        .expiration_enforcement(ExpirationEnforcement::Safe)
        .load()
        .await
        .expect("tough loads the repository over HTTP")
    })
}

/// tough's client over file:// URLs, trusting `metadata/1.root.json`.
fn load_files(repo: &Path) -> Repository {
    let root = fs::read(repo.join("metadata").join("1.root.json")).unwrap();
    block_on(async {
        RepositoryLoader::new(
            &root,
            url::Url::from_directory_path(repo.join("metadata")).unwrap(),
            url::Url::from_directory_path(repo.join("targets")).unwrap(),
        )
        .transport(FilesystemTransport)
        .expiration_enforcement(ExpirationEnforcement::Safe)
        .load()
        .await
        .expect("tough loads the repository from files")
    })
}

fn read_target(repository: &Repository, name: &str) -> Vec<u8> {
    block_on(async {
        repository
            .read_target(&TargetName::new(name).unwrap())
            .await
            .unwrap_or_else(|error| panic!("target {name}: {error}"))
            .unwrap_or_else(|| panic!("target {name} is not listed"))
            .into_vec()
            .await
            .unwrap_or_else(|error| panic!("target {name}: {error}"))
    })
}

fn update_manifest(repository: &Repository) -> UpdateManifest {
    UpdateManifest::from_json(
        UPDATE_MANIFEST_TARGET,
        &read_target(repository, UPDATE_MANIFEST_TARGET),
    )
    .expect("the update manifest parses")
}

fn target_names(repository: &Repository) -> BTreeSet<String> {
    repository
        .all_targets()
        .map(|(name, _)| name.raw().to_string())
        .collect()
}

/// Every artifact of every build is listed in the update manifest exactly as
/// the build describes it, and its bytes read through tough hash to the
/// build's sha256.
fn assert_serves_builds(repository: &Repository, builds: &[&Build]) {
    let manifest = update_manifest(repository);
    for build in builds {
        let version = os_format::update_manifest::parse_version(&build.manifest.version).unwrap();
        let update = manifest
            .find(&build.manifest.variant, &version)
            .unwrap_or_else(|| {
                panic!(
                    "{} {version} is not in the manifest",
                    build.manifest.variant
                )
            });
        assert_eq!(update.arch, build.manifest.arch);
        assert_eq!(update.verity, build.manifest.verity);
        assert_eq!(update.kernel_version, build.manifest.kernel_version);
        assert_eq!(update.required_units, build.manifest.required_units);
        assert_eq!(update.build_time, build.manifest.source_date_epoch);
        assert_eq!(update.targets.len(), build.manifest.artifacts.len());
        for (target, artifact) in update.targets.iter().zip(&build.manifest.artifacts) {
            assert_eq!(&target.artifact, artifact);
            assert_eq!(
                target.target,
                format!(
                    "{}-{}-{}",
                    build.manifest.variant, build.manifest.version, artifact.name
                )
            );
            let bytes = read_target(repository, &target.target);
            assert_eq!(bytes.len() as u64, artifact.size, "{}", target.target);
            assert_eq!(sha256_hex(&bytes), artifact.sha256, "{}", target.target);
        }
    }
}

// ---------------------------------------------------------------------------
// Publishing and reading back
// ---------------------------------------------------------------------------

#[test]
fn publish_two_versions_and_read_them_back_over_http() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    let v2 = site.build("1.1.0");

    let report = site.publish(&v1, &[]).ok();
    assert_eq!(report["version"], "1.0.0", "{report}");
    assert_eq!(report["variant"], VARIANT);
    assert_eq!(report["metadata_version"], 1);
    assert_eq!(
        report["targets"],
        serde_json::json!(v1.target_names()),
        "{report}"
    );

    let before = jiff::Timestamp::now();
    let report = site
        .publish(
            &v2,
            &[
                "--wave",
                "512@+1h",
                "--wave",
                "2048@2099-01-01T00:00:00Z",
                "--max-version",
                "1.2.0",
            ],
        )
        .ok();
    let after = jiff::Timestamp::now();
    assert_eq!(report["version"], "1.1.0");
    assert_eq!(report["metadata_version"], 2);

    // Layout: every root, versioned targets and snapshot, one timestamp;
    // targets named by their own sha256.
    let metadata: BTreeSet<String> = fs::read_dir(site.repo.join("metadata"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in [
        "1.root.json",
        "root.json",
        "1.targets.json",
        "2.targets.json",
        "1.snapshot.json",
        "2.snapshot.json",
        "timestamp.json",
    ] {
        assert!(
            metadata.contains(name),
            "no metadata/{name} in {metadata:?}"
        );
    }
    assert_eq!(
        fs::read(site.repo.join("metadata/root.json")).unwrap(),
        site.first_root()
    );
    assert_eq!(
        site.first_root(),
        fs::read(site.keys.join("root.json")).unwrap()
    );
    let mut target_files = BTreeSet::new();
    for entry in fs::read_dir(site.repo.join("targets")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let (prefix, target) = name.split_once('.').expect("<sha256>.<name>");
        assert_eq!(
            prefix,
            sha256_hex(&fs::read(entry.path()).unwrap()),
            "targets/{name} is not named by its sha256"
        );
        target_files.insert(target.to_string());
    }
    for name in v1.target_names().iter().chain(&v2.target_names()) {
        assert!(target_files.contains(name), "no targets/<sha256>.{name}");
    }
    assert!(target_files.contains(UPDATE_MANIFEST_TARGET));
    let leftovers: Vec<_> = fs::read_dir(&site.site)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "repo")
        .collect();
    assert!(leftovers.is_empty(), "left beside the repo: {leftovers:?}");

    // `repo validate`: every target read back through tough.
    let validation = site.validate();
    let manifest_sha256 = site.metadata("2.targets.json")["signed"]["targets"]
        [UPDATE_MANIFEST_TARGET]["hashes"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest_bytes = fs::read(
        site.repo
            .join("targets")
            .join(format!("{manifest_sha256}.{UPDATE_MANIFEST_TARGET}")),
    )
    .expect("the signed manifest.json");
    let artifact_bytes: u64 = v1
        .manifest
        .artifacts
        .iter()
        .chain(&v2.manifest.artifacts)
        .map(|artifact| artifact.size)
        .sum();
    assert_eq!(validation["root_version"], 1, "{validation}");
    assert_eq!(validation["targets_checked"], 9, "{validation}");
    assert_eq!(validation["updates"], 2, "{validation}");
    assert_eq!(
        validation["target_bytes"],
        artifact_bytes + manifest_bytes.len() as u64,
        "{validation}"
    );

    // `repo list --json` (the global flag before the subcommand this time).
    let listing = racklet(["--json", "repo", "list", "--repo", text(&site.repo)]).ok();
    let updates = listed_updates(&listing);
    assert_eq!(
        updates.keys().collect::<Vec<_>>(),
        ["1.0.0", "1.1.0"],
        "{listing}"
    );
    assert_eq!(updates["1.0.0"]["max_version"], "1.0.0");
    assert_eq!(updates["1.0.0"]["waves"], serde_json::json!([]));
    assert_eq!(updates["1.1.0"]["max_version"], "1.2.0");
    let waves = updates["1.1.0"]["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 2, "{listing}");
    assert_eq!(waves[0]["seed_below"], 512);
    assert_eq!(waves[1]["seed_below"], 2048);
    assert_eq!(waves[1]["start"], "2099-01-01T00:00:00Z");
    let first: jiff::Timestamp = waves[0]["start"].as_str().unwrap().parse().unwrap();
    let hour = jiff::SignedDuration::from_hours(1);
    assert!(
        first >= jiff::Timestamp::from_second((before + hour).as_second()).unwrap()
            && first <= after + hour,
        "wave +1h resolved to {first} (published between {before} and {after})"
    );
    assert_eq!(first.subsec_nanosecond(), 0, "whole seconds");
    for role in ["root", "targets", "snapshot", "timestamp"] {
        assert_eq!(
            role_state(&listing["roles"], role)["state"],
            "ok",
            "{listing}"
        );
    }
    assert_eq!(role_state(&listing["roles"], "timestamp")["version"], 2);

    // tough's client over HTTP, trusting only the first root.
    let server = serve(&site.repo);
    let repository = load_http(&server, &site.first_root());
    assert_eq!(repository.root().signed.version.get(), 1);
    let mut expected: BTreeSet<String> = v1
        .target_names()
        .into_iter()
        .chain(v2.target_names())
        .collect();
    expected.insert(UPDATE_MANIFEST_TARGET.to_string());
    assert_eq!(target_names(&repository), expected);
    assert_serves_builds(&repository, &[&v1, &v2]);
    let manifest = update_manifest(&repository);
    assert_eq!(manifest.updates.len(), 2);
    let served = server.served.lock().unwrap().clone();
    assert!(
        served.iter().any(|path| path == "metadata/timestamp.json"),
        "{served:?}"
    );
    assert!(
        served
            .iter()
            .any(|path| path.starts_with("targets/") && path.ends_with(".manifest.json")),
        "{served:?}"
    );
}

// ---------------------------------------------------------------------------
// Bad input: refused, explained, nothing changed
// ---------------------------------------------------------------------------

#[test]
fn publishing_the_same_version_again_is_refused() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    let before = site.snapshot();

    // The same build again, and a different build with the same version.
    for build in [&v1, &site.build("1.0.0")] {
        let run = site.publish(build, &[]);
        run.refused(&["1.0.0", "already published", "higher version"]);
        assert_eq!(run.json()["ok"], false, "--json reports the failure");
        site.assert_unchanged(&before, "same version again");
    }
}

#[test]
fn replacing_a_released_version_is_refused() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let before = site.snapshot();
    let run = site.publish(&site.build("1.0.0"), &["--replace"]);
    run.refused(&["1.0.0", "already released", "cannot be replaced"]);
    site.assert_unchanged(&before, "--replace of a released version");

    // A rollout whose first wave has started is released too, even though
    // its last wave is still ahead.
    site.publish(
        &site.build("1.1.0"),
        &["--wave", "512@+1h", "--wave", "2048@+2d"],
    )
    .ok();
    let before = site.snapshot();
    let run = site.publish(
        &site.build("1.1.0"),
        &["--replace", "--now", &rfc3339(hours_from_now(2))],
    );
    run.refused(&["1.1.0", "already released"]);
    site.assert_unchanged(&before, "--replace after the first wave started");
}

#[test]
fn replacing_a_version_whose_rollout_has_not_started_is_accepted() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    let first = site.build("1.1.0");
    site.publish(&first, &["--wave", "512@+1d", "--wave", "2048@+2d"])
        .ok();
    let second = site.build("1.1.0");
    let report = site
        .publish(&second, &["--replace", "--wave", "2048@+3d"])
        .ok();
    assert_eq!(report["version"], "1.1.0");
    assert_eq!(report["metadata_version"], 3);

    let listing = site.list();
    let updates = listed_updates(&listing);
    assert_eq!(updates.len(), 2, "replaced, not added: {listing}");
    let waves = updates["1.1.0"]["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 1, "the replacement's waves: {listing}");
    assert_eq!(waves[0]["seed_below"], 2048);

    let repository = load_files(&site.repo);
    assert_serves_builds(&repository, &[&v1, &second]);
    for (old, new) in first
        .manifest
        .artifacts
        .iter()
        .zip(&second.manifest.artifacts)
    {
        assert_ne!(old.sha256, new.sha256);
    }
    let validation = site.validate();
    assert_eq!(validation["updates"], 2, "{validation}");
    assert_eq!(validation["targets_checked"], 9, "{validation}");
}

#[test]
fn a_version_lower_than_the_newest_is_refused() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    site.publish(&site.build("2.0.0"), &[]).ok();
    let before = site.snapshot();
    let run = site.publish(&site.build("1.5.0"), &[]);
    run.refused(&["1.5.0", "lower than the newest published version 2.0.0"]);
    site.assert_unchanged(&before, "lower version");
    // Semver precedence, not string order: 1.10.0 > 1.9.0 > 1.5.0 ... but < 2.0.0.
    let run = site.publish(&site.build("1.10.0"), &[]);
    run.refused(&["1.10.0", "lower than the newest"]);
    site.assert_unchanged(&before, "lower version (1.10.0)");
    site.publish(&site.build("2.0.1"), &[]).ok();
    site.publish(&site.build("2.10.0"), &[]).ok();
    let run = site.publish(&site.build("2.9.0"), &[]);
    run.refused(&["2.9.0", "lower than the newest published version 2.10.0"]);
}

#[test]
fn a_build_that_does_not_match_its_manifest_is_refused() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let before = site.snapshot();

    // One flipped byte.
    let flipped = site.build("1.1.0");
    let path = flipped.artifact_path("uki-a.efi");
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let run = site.publish(&flipped, &[]);
    run.refused(&[
        "uki-a.efi",
        "does not match",
        "manifest.json",
        &flipped.manifest.artifacts[2].sha256,
        &sha256_hex(&bytes),
    ]);
    site.assert_unchanged(&before, "flipped byte");

    // A truncated artifact.
    let short = site.build("1.1.0");
    let path = short.artifact_path("root.erofs.zst");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let run = site.publish(&short, &[]);
    run.refused(&[
        "root.erofs.zst",
        "does not match",
        &format!("{} bytes", bytes.len() - 1),
    ]);
    site.assert_unchanged(&before, "truncated artifact");

    // A missing artifact.
    let missing = site.build("1.1.0");
    fs::remove_file(missing.artifact_path("verity.img.zst")).unwrap();
    let run = site.publish(&missing, &[]);
    run.refused(&["verity.img.zst"]);
    site.assert_unchanged(&before, "missing artifact");

    // No manifest at all, and a manifest of an unknown schema.
    let bare = site.build("1.1.0");
    fs::remove_file(bare.dir.join("manifest.json")).unwrap();
    site.publish(&bare, &[])
        .refused(&["manifest.json", "cannot read the build's manifest"]);
    site.assert_unchanged(&before, "no manifest");
    let future = site.build("1.1.0");
    let mut manifest = future.manifest.clone();
    manifest.schema = 99;
    fs::write(future.dir.join("manifest.json"), manifest.to_json()).unwrap();
    site.publish(&future, &[]).refused(&["schema 99"]);
    site.assert_unchanged(&before, "unknown schema");

    // A version that is not semver.
    let odd = site.build("1.1");
    site.publish(&odd, &[]).refused(&["'1.1' is not a version"]);
    site.assert_unchanged(&before, "not a version");
}

#[test]
fn missing_keys_are_refused() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let before = site.snapshot();

    let nowhere = site.base.join("no-such-keys");
    let run = site.publish_with(&site.build("1.1.0"), &nowhere, &[]);
    run.refused(&["no signing keys here", "keys generate", text(&nowhere)]);
    site.assert_unchanged(&before, "missing keys directory");

    // The root is there but its private keys are not.
    let keyless = site.base.join("keyless");
    copy_dir(&site.keys, &keyless);
    for entry in fs::read_dir(keyless.join("keys")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let run = site.publish_with(&site.build("1.1.0"), &keyless, &[]);
    run.refused(&["missing or wrong", "key"]);
    site.assert_unchanged(&before, "no private keys");

    // A first publish without keys creates nothing.
    let fresh = Site::new();
    let run = fresh.publish_with(&fresh.build("1.0.0"), &nowhere, &[]);
    run.refused(&["no signing keys here"]);
    assert!(fresh.snapshot().is_empty(), "{:?}", fresh.snapshot());
}

/// FAILS with the current publisher (image-builder/src/repo/mod.rs,
/// `write_new_version`): keys from another `keys generate` have a root of
/// the same version (1), so the version check passes; tough's `write`
/// then overwrites the staged `metadata/1.root.json` with the other key
/// directory's root, and the post-write check loads the staging copy from
/// that *new* 1.root.json, so it passes too. The publish succeeds and
/// silently replaces the repository's trust anchor: every node that trusts
/// the original root can no longer update.
#[test]
fn keys_from_another_generate_are_refused() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    let before = site.snapshot();
    let original_root = site.first_root();

    let other = site.base.join("other-keys");
    racklet(["--json", "keys", "generate", "--dir", text(&other)]).ok();
    let run = site.publish_with(&site.build("1.1.0"), &other, &[]);
    let trusted = site.first_root() == original_root;
    // Whatever the wording, the refusal must be about the root/keys.
    run.refused(&["root"]);
    assert!(
        ["key", "sign", "trust"]
            .iter()
            .any(|word| run.stderr.contains(word)),
        "the error should say the keys did not sign this repository: {}",
        run.stderr
    );
    assert!(trusted, "metadata/1.root.json was replaced");
    site.assert_unchanged(&before, "keys from another generate");
}

#[test]
fn an_expired_root_is_refused() {
    // An existing repository, published to "two years later".
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let before = site.snapshot();
    let later = rfc3339(hours_from_now(24 * 730));
    let run = site.publish(&site.build("1.1.0"), &["--now", &later]);
    run.refused(&["root version 1 expired", "rotate-root"]);
    site.assert_unchanged(&before, "expired root (publish)");
    site.repo_with_keys("refresh", &["--now", &later])
        .refused(&["root version 1 expired"]);
    site.assert_unchanged(&before, "expired root (refresh)");

    // Keys whose root expires the moment they are made.
    let expired = Site::with_keys(&["--root-expiry-days", "0"]);
    let run = expired.publish(&expired.build("1.0.0"), &[]);
    run.refused(&["expired", "rotate-root"]);
    assert!(
        expired.snapshot().is_empty(),
        "nothing is created: {:?}",
        expired.snapshot()
    );
}

#[test]
fn invalid_wave_specs_and_options_are_refused() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let before = site.snapshot();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--wave", "junk"], &["--wave junk", "SEED_BELOW@TIME"]),
        (&["--wave", "x@+1h"], &["'x' is not a number"]),
        (&["--wave", "2048@+3x"], &["+N followed by h or d"]),
        (&["--wave", "2048@+h"], &["+N followed by h or d"]),
        (
            &["--wave", "2048@2026-13-01T00:00:00Z"],
            &["not an RFC 3339 time"],
        ),
        (&["--wave", "2048@tomorrow"], &["not an RFC 3339 time"]),
        (&["--wave", "100@+1h"], &["must reach seed 2048"]),
        (&["--wave", "4096@+1h"], &["at most 2048"]),
        (&["--wave", "0@+1h"], &["must be above 0"]),
        (
            &[
                "--wave", "1024@+1h", "--wave", "512@+2h", "--wave", "2048@+3h",
            ],
            &["must be above 1024"],
        ),
        (
            &["--wave", "1024@+2d", "--wave", "2048@+1d"],
            &["before the wave"],
        ),
        (
            &["--wave", "2048@2099-01-01T00:00:00.5Z"],
            &["fractional seconds"],
        ),
        (&["--max-version", "1.0.0"], &["--max-version", "below"]),
        (&["--max-version", "banana"], &["'banana' is not a version"]),
        // Metadata that would be expired the moment it is written.
        (&["--timestamp-expiry-days", "0"], &["timestamp", "expired"]),
    ];
    for (extra, words) in cases {
        let run = site.publish(&site.build("1.1.0"), extra);
        run.refused(words);
        site.assert_unchanged(&before, &format!("publish {}", extra.join(" ")));
    }
    // The well-formed version of the same thing goes through.
    site.publish(
        &site.build("1.1.0"),
        &["--wave", "1024@+1h", "--wave", "2048@+1d"],
    )
    .ok();
}

// ---------------------------------------------------------------------------
// Root rotation
// ---------------------------------------------------------------------------

#[test]
fn root_rotation_is_followed_by_a_client_trusting_only_the_first_root() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    let first_root = site.first_root();
    let old_keys = site.base.join("keys-before-rotation");
    copy_dir(&site.keys, &old_keys);

    let report = racklet(["--json", "keys", "rotate-root", "--dir", text(&site.keys)]).ok();
    assert_eq!(report["root_version"], 2, "{report}");
    assert!(
        fs::read_dir(site.keys.join("retired")).unwrap().count() >= 1,
        "the old root key is retired"
    );

    let v2 = site.build("1.1.0");
    site.publish(&v2, &[]).ok();
    let root2 = fs::read(site.repo.join("metadata/2.root.json")).expect("2.root.json published");
    assert_eq!(
        site.first_root(),
        first_root,
        "1.root.json is kept as it was"
    );
    assert_eq!(
        root2,
        fs::read(site.keys.join("roots/2.root.json")).unwrap()
    );
    assert_eq!(
        root2,
        fs::read(site.repo.join("metadata/root.json")).unwrap()
    );
    let root2_json: Value = serde_json::from_slice(&root2).unwrap();
    assert_eq!(root2_json["signed"]["version"], 2);
    assert_eq!(
        root2_json["signatures"].as_array().unwrap().len(),
        2,
        "signed by the old and the new root key: {root2_json}"
    );

    let server = serve(&site.repo);
    let repository = load_http(&server, &first_root);
    assert_eq!(repository.root().signed.version.get(), 2);
    assert_serves_builds(&repository, &[&v1, &v2]);
    assert!(
        server
            .served
            .lock()
            .unwrap()
            .iter()
            .any(|path| path == "metadata/2.root.json"),
        "the client fetched 2.root.json"
    );
    assert_eq!(site.validate()["root_version"], 2);

    // The pre-rotation key directory can no longer publish.
    let before = site.snapshot();
    let run = site.publish_with(&site.build("1.2.0"), &old_keys, &[]);
    run.refused(&[
        "already trusts root version 2",
        "newer than this key directory",
    ]);
    site.assert_unchanged(&before, "publish with pre-rotation keys");

    // A second rotation, of the root and the targets keys, published by a
    // refresh alone.
    racklet([
        "--json",
        "keys",
        "rotate-root",
        "--dir",
        text(&site.keys),
        "--rotate-role",
        "root",
        "--rotate-role",
        "targets",
    ])
    .ok();
    site.repo_with_keys("refresh", &[]).ok();
    assert!(site.repo.join("metadata/3.root.json").exists());
    let repository = load_http(&server, &first_root);
    assert_eq!(repository.root().signed.version.get(), 3);
    assert_serves_builds(&repository, &[&v1, &v2]);
    let validation = site.validate();
    assert_eq!(validation["root_version"], 3, "{validation}");
    assert_eq!(validation["updates"], 2, "{validation}");
}

// ---------------------------------------------------------------------------
// Refresh and expiry
// ---------------------------------------------------------------------------

#[test]
fn refresh_extends_expiry_and_check_expiry_reports_it() {
    let site = Site::new();
    let v1 = site.build("1.0.0");
    site.publish(&v1, &["--timestamp-expiry-days", "1"]).ok();
    let listing_before = site.list();
    let timestamp = site.metadata("timestamp.json");
    let old_version = timestamp["signed"]["version"].as_u64().unwrap();
    let old_expires: jiff::Timestamp = timestamp["signed"]["expires"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let report = site.repo_with_keys("refresh", &[]).ok();
    assert_eq!(report["metadata_version"], old_version + 1, "{report}");
    let timestamp = site.metadata("timestamp.json");
    assert_eq!(timestamp["signed"]["version"], old_version + 1);
    let new_expires: jiff::Timestamp = timestamp["signed"]["expires"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        new_expires > old_expires + jiff::SignedDuration::from_hours(24 * 5),
        "timestamp expiry {old_expires} -> {new_expires}"
    );
    assert_eq!(new_expires.subsec_nanosecond(), 0);
    assert_eq!(
        report["timestamp_expires"].as_str().unwrap(),
        new_expires.to_string()
    );
    let listing = site.list();
    for role in ["targets", "snapshot", "timestamp"] {
        assert_eq!(
            role_state(&listing["roles"], role)["version"],
            old_version + 1,
            "{role}: {listing}"
        );
    }
    assert_eq!(
        listing["updates"], listing_before["updates"],
        "a refresh changes no entry"
    );
    assert_serves_builds(&load_files(&site.repo), &[&v1]);
    site.validate();

    // Everything fresh: exit 0, all "ok".
    let value = site.repo_command("check-expiry", &[]).ok();
    assert_eq!(value["ok"], true);
    for role in ["root", "targets", "snapshot", "timestamp"] {
        assert_eq!(role_state(&value["roles"], role)["state"], "ok", "{value}");
    }

    // Warn 10 days ahead: the timestamp (7 days) expires soon, nothing else.
    let value = site
        .repo_command("check-expiry", &["--warn-days", "10"])
        .ok();
    assert_eq!(value["ok"], true, "expires-soon is not a failure: {value}");
    assert_eq!(
        role_state(&value["roles"], "timestamp")["state"],
        "expires-soon",
        "{value}"
    );
    for role in ["root", "targets", "snapshot"] {
        assert_eq!(role_state(&value["roles"], role)["state"], "ok", "{value}");
    }

    // After the timestamp's expiry (but not the snapshot's): fails naming it.
    let before = site.snapshot();
    let after_timestamp = rfc3339(new_expires + jiff::SignedDuration::from_hours(1));
    let run = site.repo_command("check-expiry", &["--now", &after_timestamp]);
    run.refused(&["expired metadata: timestamp", "repo refresh"]);
    assert!(!run.stderr.contains("snapshot"), "{}", run.stderr);
    assert_eq!(run.json()["ok"], false);
    assert!(run.json()["error"]
        .as_str()
        .unwrap()
        .contains("expired metadata: timestamp"));

    // After everything: every role is named.
    let run = site.repo_command(
        "check-expiry",
        &["--now", &rfc3339(hours_from_now(24 * 800))],
    );
    run.refused(&["root", "targets", "snapshot", "timestamp", "rotate-root"]);
    site.assert_unchanged(&before, "check-expiry");

    // `repo list` still works on an expired repository and says so.
    let listing = site.repo_command("list", &["--now", &after_timestamp]).ok();
    assert_eq!(
        role_state(&listing["roles"], "timestamp")["state"],
        "expired",
        "{listing}"
    );
}

// ---------------------------------------------------------------------------
// Ceilings
// ---------------------------------------------------------------------------

#[test]
fn set_max_version_lowers_the_ceiling() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    site.publish(&site.build("1.1.0"), &[]).ok();
    let other = site.build_of("rpi4", "3.0.0");
    site.publish(&other, &[]).ok();

    let report = site
        .repo_with_keys(
            "set-max-version",
            &["--variant", VARIANT, "--max-version", "1.0.0"],
        )
        .ok();
    assert_eq!(report["entries"], 2, "{report}");
    assert_eq!(report["max_version"], "1.0.0");
    assert_eq!(report["metadata_version"], 4);

    let listing = site.list();
    for update in listing["updates"].as_array().unwrap() {
        let expected = if update["variant"] == VARIANT {
            "1.0.0"
        } else {
            "3.0.0"
        };
        assert_eq!(update["max_version"], expected, "{update}");
    }
    // What a client sees, through tough.
    let manifest = update_manifest(&load_files(&site.repo));
    assert_eq!(manifest.updates.len(), 3);
    for update in &manifest.updates {
        let expected = if update.variant == VARIANT {
            "1.0.0"
        } else {
            "3.0.0"
        };
        assert_eq!(update.max_version.to_string(), expected, "{update:?}");
    }
    site.validate();

    let before = site.snapshot();
    site.repo_with_keys(
        "set-max-version",
        &["--variant", "no-such-board", "--max-version", "1.0.0"],
    )
    .refused(&["no-such-board", "nothing of it is published"]);
    site.assert_unchanged(&before, "unknown variant");
    site.repo_with_keys(
        "set-max-version",
        &["--variant", VARIANT, "--max-version", "1.0"],
    )
    .refused(&["'1.0' is not a version"]);
    site.assert_unchanged(&before, "bad ceiling");
}

// ---------------------------------------------------------------------------
// Thresholds
// ---------------------------------------------------------------------------

fn key_files(keys: &Path, role: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(keys.join("keys"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{role}-"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn thresholds_of_two_keys_publish_and_rotate() {
    let site = Site::with_keys(&["--role-keys", "root=2/2", "--role-keys", "targets=2/2"]);
    let root1: Value =
        serde_json::from_slice(&fs::read(site.keys.join("root.json")).unwrap()).unwrap();
    assert_eq!(root1["signed"]["roles"]["root"]["threshold"], 2);
    assert_eq!(
        root1["signed"]["roles"]["root"]["keyids"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(root1["signed"]["roles"]["targets"]["threshold"], 2);
    assert_eq!(root1["signatures"].as_array().unwrap().len(), 2);
    assert_eq!(key_files(&site.keys, "root").len(), 2);
    assert_eq!(key_files(&site.keys, "targets").len(), 2);

    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    assert_eq!(
        site.metadata("1.targets.json")["signatures"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "targets signed by both targets keys"
    );

    let report = racklet(["--json", "keys", "rotate-root", "--dir", text(&site.keys)]).ok();
    assert_eq!(report["root_version"], 2, "{report}");
    let v2 = site.build("1.1.0");
    site.publish(&v2, &[]).ok();
    let root2 = site.metadata("2.root.json");
    assert_eq!(root2["signed"]["roles"]["root"]["threshold"], 2);
    assert_eq!(
        root2["signatures"].as_array().unwrap().len(),
        4,
        "two old and two new root keys: {root2}"
    );
    let server = serve(&site.repo);
    let repository = load_http(&server, &site.first_root());
    assert_eq!(repository.root().signed.version.get(), 2);
    assert_serves_builds(&repository, &[&v1, &v2]);
    assert_eq!(site.validate()["root_version"], 2);

    // One of two targets keys is not enough to publish.
    let before = site.snapshot();
    let stash = site.base.join("stash");
    fs::create_dir_all(&stash).unwrap();
    let targets_key = key_files(&site.keys, "targets")[0].clone();
    let stashed_target = stash.join(targets_key.file_name().unwrap());
    fs::rename(&targets_key, &stashed_target).unwrap();
    site.publish(&site.build("1.2.0"), &[]).refused(&[
        "missing or wrong targets key",
        "needs 2 signature(s)",
        "only 1",
    ]);
    site.assert_unchanged(&before, "one of two targets keys");
    fs::rename(&stashed_target, &targets_key).unwrap();

    // One of two root keys is not enough to rotate; the key directory stays as it was.
    let root_key = key_files(&site.keys, "root")[0].clone();
    let stashed_root = stash.join(root_key.file_name().unwrap());
    fs::rename(&root_key, &stashed_root).unwrap();
    let keys_before = snapshot(&site.keys);
    racklet(["keys", "rotate-root", "--dir", text(&site.keys)])
        .refused(&["missing or wrong root key"]);
    assert_eq!(
        snapshot(&site.keys),
        keys_before,
        "the key directory changed"
    );
    fs::rename(&stashed_root, &root_key).unwrap();
    site.publish(&site.build("1.2.0"), &[]).ok();
}

#[test]
fn a_threshold_below_the_key_count_signs_with_the_keys_present() {
    let site = Site::with_keys(&["--role-keys", "root=3/2"]);
    let v1 = site.build("1.0.0");
    site.publish(&v1, &[]).ok();
    // Lose one of three root keys: 2 still meet the threshold.
    fs::remove_file(&key_files(&site.keys, "root")[0]).unwrap();
    let report = racklet(["--json", "keys", "rotate-root", "--dir", text(&site.keys)]).ok();
    assert_eq!(report["root_version"], 2, "{report}");
    let v2 = site.build("1.1.0");
    site.publish(&v2, &[]).ok();
    let repository = load_files(&site.repo);
    assert_eq!(repository.root().signed.version.get(), 2);
    assert_serves_builds(&repository, &[&v1, &v2]);
    site.validate();
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

/// FAILS with the current publisher: nothing serialises changes to a
/// repository (image-builder/src/repo/mod.rs `publish`/`write_new_version`,
/// staging.rs). Two publishes started together both stage from the same
/// base, both sign metadata version N+1, both report success, and the
/// second `renameat2(RENAME_EXCHANGE)` throws the first one's version away.
/// Either both versions must end up published, or the loser must fail.
#[test]
fn concurrent_publishes_never_lose_a_version() {
    let site = Site::new();
    site.publish(&site.build("1.0.0"), &[]).ok();
    let mut succeeded: BTreeSet<String> = BTreeSet::from(["1.0.0".to_string()]);
    let mut metadata_versions = BTreeSet::new();
    for round in 0..3 {
        let builds = [
            site.build(&format!("1.{}.0", 2 * round + 1)),
            site.build(&format!("1.{}.0", 2 * round + 2)),
        ];
        let children: Vec<_> = builds
            .iter()
            .map(|build| {
                Command::new(env!("CARGO_BIN_EXE_racklet-image"))
                    .args([
                        "--json",
                        "publish",
                        "--build",
                        text(&build.dir),
                        "--repo",
                        text(&site.repo),
                        "--keys",
                        text(&site.keys),
                    ])
                    .env("RACKLET_LOG", "warn")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (child, build) in children.into_iter().zip(&builds) {
            let output = child.wait_with_output().unwrap();
            if output.status.success() {
                let report: Value = serde_json::from_slice(&output.stdout).unwrap();
                assert!(
                    metadata_versions.insert(report["metadata_version"].as_u64().unwrap()),
                    "two publishes both signed metadata version {}",
                    report["metadata_version"]
                );
                succeeded.insert(build.manifest.version.clone());
            }
        }
    }
    let listed: BTreeSet<String> = listed_updates(&site.list()).into_keys().collect();
    assert_eq!(
        listed, succeeded,
        "every publish that reported success must be in the repository"
    );
    site.validate();
}
