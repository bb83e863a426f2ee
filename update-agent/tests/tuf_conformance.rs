//! The agent's TUF client (`update_agent::tuf`) and the conformance CLI
//! (`racklet-tuf-conformance`) against repositories built here: roots signed
//! with ed25519 keys from `openssl genpkey` (PKCS#8 DER, signed with
//! `openssl pkeyutl`), everything else signed by tough's editor, served from a
//! directory as `file://` URLs or over HTTP on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use os_format::update_manifest::UpdateManifest;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{Hashes, RoleKeys, RoleType, Root, Signature, Signed, Target};
use tough::sign::{parse_keypair, Sign};
use tough::TargetName;
use update_agent::tuf::{LoadedRepository, RootSource, TufClient, TufError};
use url::Url;

const PAYLOAD: &str = "payload.bin";
const MANIFEST: &str = "manifest.json";

// ---------------------------------------------------------------------------
// A signed test repository.

fn nonzero(value: u64) -> NonZeroU64 {
    NonZeroU64::new(value).expect("versions start at 1")
}

/// Now plus `seconds`, in whole seconds (python-tuf and the spec want no
/// fractions).
fn from_now(seconds: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + seconds).unwrap()
}

const DAY: i64 = 24 * 3600;

/// An ed25519 key in a PKCS#8 DER file.
struct Key {
    path: PathBuf,
    id: Decoded<Hex>,
    public: tough::schema::key::Key,
}

impl Key {
    fn generate(path: PathBuf) -> Key {
        let status = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "ed25519",
                "-outform",
                "DER",
                "-out",
            ])
            .arg(&path)
            .status()
            .expect("openssl runs (the tests generate keys with it)");
        assert!(status.success(), "openssl genpkey failed");
        let der = fs::read(&path).unwrap();
        let public = parse_keypair(&der).expect("tough reads the key").tuf_key();
        let id = public.key_id().unwrap();
        Key { path, id, public }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let directory = self.path.parent().unwrap();
        let message_path = directory.join("message.bin");
        let signature_path = directory.join("signature.bin");
        fs::write(&message_path, message).unwrap();
        let status = Command::new("openssl")
            .args(["pkeyutl", "-sign", "-rawin", "-keyform", "DER", "-inkey"])
            .arg(&self.path)
            .arg("-in")
            .arg(&message_path)
            .arg("-out")
            .arg(&signature_path)
            .status()
            .unwrap();
        assert!(status.success(), "openssl pkeyutl -sign failed");
        fs::read(signature_path).unwrap()
    }

    fn source(&self) -> Box<dyn KeySource> {
        Box::new(LocalKeySource {
            path: self.path.clone(),
        })
    }
}

/// TUF's canonical JSON (OLPC): sorted keys, no white space, only `"` and
/// `\` escaped, integers only.
fn canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(value) => out.extend_from_slice(if *value { b"true" } else { b"false" }),
        Value::Number(number) => {
            assert!(number.is_i64() || number.is_u64(), "no floats in TUF");
            out.extend_from_slice(number.to_string().as_bytes());
        }
        Value::String(text) => {
            out.push(b'"');
            for character in text.chars() {
                if character == '"' || character == '\\' {
                    out.push(b'\\');
                }
                let mut buffer = [0u8; 4];
                out.extend_from_slice(character.encode_utf8(&mut buffer).as_bytes());
            }
            out.push(b'"');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                canonical_json(&Value::String(key.clone()), out);
                out.push(b':');
                canonical_json(&map[key], out);
            }
            out.push(b'}');
        }
    }
}

/// A root with `key` for every role, signed by each of `signers`.
fn signed_root(version: u64, key: &Key, signers: &[&Key]) -> Signed<Root> {
    let role_keys = || RoleKeys {
        keyids: vec![key.id.clone()],
        threshold: nonzero(1),
        _extra: HashMap::new(),
    };
    let root = Root {
        spec_version: "1.0.0".to_string(),
        consistent_snapshot: true,
        version: nonzero(version),
        expires: from_now(365 * DAY),
        keys: HashMap::from([(key.id.clone(), key.public.clone())]),
        roles: [
            RoleType::Root,
            RoleType::Targets,
            RoleType::Snapshot,
            RoleType::Timestamp,
        ]
        .into_iter()
        .map(|role| (role, role_keys()))
        .collect(),
        _extra: HashMap::new(),
    };
    let mut message = Vec::new();
    canonical_json(&serde_json::to_value(&root).unwrap(), &mut message);
    let signatures = signers
        .iter()
        .map(|signer| Signature {
            keyid: signer.id.clone(),
            sig: Decoded::from(signer.sign(&message)),
        })
        .collect();
    Signed {
        signed: root,
        signatures,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A repository under `metadata/` and `targets/` (consistent snapshots, flat
/// target names), keys and roots under `work/`.
struct TestRepo {
    _directory: TempDir,
    base: PathBuf,
    key: Key,
    keys_made: u32,
    root_version: u64,
    root_path: PathBuf,
    version: u64,
    targets: BTreeMap<String, Vec<u8>>,
    timestamp_expires: jiff::Timestamp,
}

impl TestRepo {
    /// Root version 1 and metadata version 1 with the update manifest and a
    /// 300 KiB payload.
    async fn new() -> TestRepo {
        let directory = tempfile::tempdir().unwrap();
        let base = directory.path().to_path_buf();
        for sub in ["metadata", "targets", "work"] {
            fs::create_dir_all(base.join(sub)).unwrap();
        }
        let key = Key::generate(base.join("work/key-1.der"));
        let root = signed_root(1, &key, &[&key]);
        let root_path = base.join("work/root-1.json");
        fs::write(&root_path, serde_json::to_vec_pretty(&root).unwrap()).unwrap();
        let payload: Vec<u8> = (0..300 * 1024u32)
            .map(|index| (index % 251) as u8)
            .collect();
        let mut repo = TestRepo {
            _directory: directory,
            base,
            key,
            keys_made: 1,
            root_version: 1,
            root_path,
            version: 0,
            targets: BTreeMap::from([
                (MANIFEST.to_string(), UpdateManifest::new().to_json()),
                (PAYLOAD.to_string(), payload),
            ]),
            timestamp_expires: from_now(7 * DAY),
        };
        repo.publish().await;
        repo
    }

    fn metadata_dir(&self) -> PathBuf {
        self.base.join("metadata")
    }

    fn targets_dir(&self) -> PathBuf {
        self.base.join("targets")
    }

    fn metadata_url(&self) -> Url {
        Url::from_directory_path(self.metadata_dir()).unwrap()
    }

    fn targets_url(&self) -> Url {
        Url::from_directory_path(self.targets_dir()).unwrap()
    }

    fn first_root(&self) -> PathBuf {
        self.metadata_dir().join("1.root.json")
    }

    /// A served metadata file.
    fn metadata(&self, file: &str) -> Vec<u8> {
        fs::read(self.metadata_dir().join(file)).unwrap()
    }

    /// Where a target's bytes are served from.
    fn target_path(&self, name: &str) -> PathBuf {
        self.targets_dir()
            .join(format!("{}.{name}", sha256_hex(&self.targets[name])))
    }

    /// Sign and write the next version of targets, snapshot and timestamp
    /// (and the current root), and the target files.
    async fn publish(&mut self) {
        self.version += 1;
        let mut editor = RepositoryEditor::new(&self.root_path).await.unwrap();
        editor
            .targets_version(nonzero(self.version))
            .unwrap()
            .targets_expires(from_now(30 * DAY))
            .unwrap()
            .snapshot_version(nonzero(self.version))
            .snapshot_expires(from_now(30 * DAY))
            .timestamp_version(nonzero(self.version))
            .timestamp_expires(self.timestamp_expires);
        for (name, bytes) in &self.targets {
            let target = Target {
                length: bytes.len() as u64,
                hashes: Hashes {
                    sha256: Decoded::from(Sha256::digest(bytes).to_vec()),
                    _extra: HashMap::new(),
                },
                custom: HashMap::new(),
                _extra: HashMap::new(),
            };
            editor
                .add_target(TargetName::new(name.as_str()).unwrap(), target)
                .unwrap();
        }
        let signed = editor.sign(&[self.key.source()]).await.unwrap();
        signed.write(self.metadata_dir()).await.unwrap();
        for name in self.targets.keys() {
            fs::write(self.target_path(name), &self.targets[name]).unwrap();
        }
    }

    /// A new root version with a new key for every role, signed by the old
    /// and the new key; written to the repository by the next `publish`.
    fn rotate_root(&mut self) {
        self.keys_made += 1;
        let new_key = Key::generate(self.base.join(format!("work/key-{}.der", self.keys_made)));
        self.root_version += 1;
        let root = signed_root(self.root_version, &new_key, &[&self.key, &new_key]);
        self.root_path = self
            .base
            .join(format!("work/root-{}.json", self.root_version));
        fs::write(&self.root_path, serde_json::to_vec_pretty(&root).unwrap()).unwrap();
        self.key = new_key;
    }
}

/// A node: the image's root and a datastore.
struct Node {
    directory: TempDir,
}

impl Node {
    fn new(image_root: &Path) -> Node {
        let directory = tempfile::tempdir().unwrap();
        fs::copy(image_root, directory.path().join("image-root.json")).unwrap();
        Node { directory }
    }

    fn image_root(&self) -> PathBuf {
        self.directory.path().join("image-root.json")
    }

    fn datastore(&self) -> PathBuf {
        self.directory.path().join("datastore")
    }

    fn client(&self, metadata_url: Url, targets_url: Url) -> TufClient {
        TufClient::new(
            metadata_url,
            targets_url,
            Duration::from_secs(10),
            self.image_root(),
            self.datastore(),
        )
    }

    fn file_client(&self, repo: &TestRepo) -> TufClient {
        self.client(repo.metadata_url(), repo.targets_url())
    }
}

/// Read a whole target through the blocking reader, as the installer does.
async fn read_target(repository: &LoadedRepository, name: &str) -> io::Result<Vec<u8>> {
    let mut reader = repository.target_reader(name).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map(|_| bytes)
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------
// A static HTTP server on 127.0.0.1 that records the paths asked for.

struct HttpServer {
    base_url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    fn serve(directory: &Path) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let directory = directory.to_path_buf();
        let log = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let directory = directory.clone();
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let _ = respond(stream, &directory, &log);
                });
            }
        });
        HttpServer { base_url, requests }
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("{}/{path}", self.base_url)).unwrap()
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|request| request.as_str() == path)
            .count()
    }
}

fn respond(stream: TcpStream, directory: &Path, log: &Mutex<Vec<String>>) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let relative = path.trim_start_matches('/');
    let body = if relative.split('/').any(|part| part == "..") {
        None
    } else {
        fs::read(directory.join(relative)).ok()
    };
    let mut stream = stream;
    match body {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)?;
        }
        None => {
            stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    stream.flush()
}

// ---------------------------------------------------------------------------
// The agent's client.

#[tokio::test]
async fn loads_and_reads_the_manifest_and_a_target_from_files() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    let versions = repository.versions();
    assert_eq!((versions.root, versions.timestamp), (1, 1));
    assert_eq!(
        repository.update_manifest().await.unwrap(),
        UpdateManifest::new()
    );
    let info = repository.target_info(PAYLOAD).unwrap();
    assert_eq!(info.length, repo.targets[PAYLOAD].len() as u64);
    assert_eq!(info.sha256, sha256_hex(&repo.targets[PAYLOAD]));
    assert_eq!(
        read_target(&repository, PAYLOAD).await.unwrap(),
        repo.targets[PAYLOAD]
    );
    // The datastore holds what tough verified.
    for file in [
        "root.json",
        "timestamp.json",
        "snapshot.json",
        "targets.json",
    ] {
        assert!(node.datastore().join(file).exists(), "{file}");
    }
    assert_eq!(repository.earliest_expiry().0, RoleType::Timestamp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_over_http() {
    let repo = TestRepo::new().await;
    let server = HttpServer::serve(&repo.base);
    let node = Node::new(&repo.first_root());
    let client = node.client(server.url("metadata/"), server.url("targets/"));
    let repository = client.load().await.unwrap();
    assert_eq!(
        repository.update_manifest().await.unwrap(),
        UpdateManifest::new()
    );
    assert_eq!(
        read_target(&repository, PAYLOAD).await.unwrap(),
        repo.targets[PAYLOAD]
    );
    let requests = server.requests();
    assert!(requests.contains(&"/metadata/2.root.json".to_string()));
    assert!(requests.contains(&"/metadata/timestamp.json".to_string()));
    assert!(requests.contains(&format!(
        "/targets/{}.{PAYLOAD}",
        sha256_hex(&repo.targets[PAYLOAD])
    )));
}

#[tokio::test]
async fn a_replayed_older_timestamp_is_a_rollback() {
    let mut repo = TestRepo::new().await;
    let old_timestamp = repo.metadata("timestamp.json");
    repo.publish().await;
    let node = Node::new(&repo.first_root());
    let client = node.file_client(&repo);
    assert_eq!(client.load().await.unwrap().versions().timestamp, 2);
    // The old, validly signed, unexpired timestamp is served again.
    fs::write(repo.metadata_dir().join("timestamp.json"), &old_timestamp).unwrap();
    let error = client.load().await.unwrap_err();
    match &error {
        TufError::Rollback {
            role,
            trusted_version,
            offered_version,
            ..
        } => {
            assert_eq!(role, "timestamp");
            assert_eq!((*trusted_version, *offered_version), (Some(2), Some(1)));
        }
        other => panic!("expected a rollback, got {other:?}"),
    }
    assert!(error.to_string().contains("rollback"), "{error}");
    // The protection is the datastore's: a node that never saw version 2
    // accepts version 1.
    let fresh = Node::new(&repo.first_root());
    assert_eq!(
        fresh
            .file_client(&repo)
            .load()
            .await
            .unwrap()
            .versions()
            .timestamp,
        1
    );
}

#[tokio::test]
async fn an_expired_timestamp_is_refused() {
    let mut repo = TestRepo::new().await;
    repo.timestamp_expires = from_now(-3600);
    repo.publish().await;
    let node = Node::new(&repo.first_root());
    let error = node.file_client(&repo).load().await.unwrap_err();
    assert!(
        matches!(&error, TufError::Expired { role, .. } if role == "timestamp"),
        "{error:?}"
    );
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test]
async fn a_tampered_target_fails_the_read() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    let path = repo.target_path(PAYLOAD);
    let mut bytes = fs::read(&path).unwrap();
    bytes[1000] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let error = read_target(&repository, PAYLOAD).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    assert!(
        matches!(
            TufError::from_io(&error),
            Some(TufError::TargetMismatch { target, .. }) if target == PAYLOAD
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn truncated_and_overlong_targets_fail_the_read() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    let path = repo.target_path(PAYLOAD);
    let original = fs::read(&path).unwrap();

    fs::write(&path, &original[..original.len() - 1]).unwrap();
    let error = read_target(&repository, PAYLOAD).await.unwrap_err();
    assert!(
        matches!(
            TufError::from_io(&error),
            Some(TufError::TargetMismatch { .. })
        ),
        "truncated: {error:?}"
    );

    let mut longer = original.clone();
    longer.extend_from_slice(b"more");
    fs::write(&path, &longer).unwrap();
    let error = read_target(&repository, PAYLOAD).await.unwrap_err();
    assert!(
        matches!(
            TufError::from_io(&error),
            Some(TufError::TargetMismatch { .. })
        ),
        "over-long: {error:?}"
    );

    fs::write(&path, &original).unwrap();
    assert_eq!(read_target(&repository, PAYLOAD).await.unwrap(), original);
}

#[tokio::test]
async fn a_tampered_manifest_is_refused() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    let path = repo.target_path(MANIFEST);
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = b' ';
    fs::write(&path, &bytes).unwrap();
    let error = repository.update_manifest().await.unwrap_err();
    assert!(
        matches!(error, TufError::TargetMismatch { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_unlisted_target_is_missing() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    assert!(repository.target_info("nope.bin").is_none());
    let error = repository.target_reader("nope.bin").unwrap_err();
    assert!(
        matches!(&error, TufError::TargetMissing { target } if target == "nope.bin"),
        "{error:?}"
    );
}

#[tokio::test]
async fn dropping_a_reader_early_stops_the_download() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let repository = node.file_client(&repo).load().await.unwrap();
    let mut reader = repository.target_reader(PAYLOAD).unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut buffer = [0u8; 10];
        reader.read_exact(&mut buffer).map(|_| buffer)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.as_slice(), &repo.targets[PAYLOAD][..10]);
    // The reader is gone; the repository still serves further reads.
    assert_eq!(
        read_target(&repository, PAYLOAD).await.unwrap(),
        repo.targets[PAYLOAD]
    );
}

#[tokio::test]
async fn a_missing_repository_is_a_transport_error_naming_the_url() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let missing = repo.base.join("elsewhere");
    let client = node.client(
        Url::from_directory_path(&missing).unwrap(),
        repo.targets_url(),
    );
    let error = client.load().await.unwrap_err();
    match &error {
        TufError::Transport { url, not_found, .. } => {
            assert!(url.ends_with("elsewhere/timestamp.json"), "{url}");
            assert!(*not_found);
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(error.to_string().contains("timestamp.json"), "{error}");
}

#[tokio::test]
async fn a_root_rotation_is_followed_and_remembered() {
    let mut repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let client = node.file_client(&repo);
    let first = client.load().await.unwrap();
    assert_eq!(first.started_from().source, RootSource::Image);
    assert_eq!(first.versions().root, 1);

    repo.rotate_root();
    repo.publish().await;
    let rotated = client.load().await.unwrap();
    assert_eq!(rotated.started_from().source, RootSource::Image);
    assert_eq!(rotated.versions().root, 2);
    let stored = client.trusted_root().unwrap();
    assert_eq!((stored.source, stored.version), (RootSource::Stored, 2));
    assert_eq!(stored.path, node.datastore().join("root.json"));

    // The next load starts from the stored root, even though the image's
    // root is version 1 and version 2 is no longer served.
    fs::remove_file(repo.metadata_dir().join("2.root.json")).unwrap();
    let again = client.load().await.unwrap();
    assert_eq!(again.started_from().source, RootSource::Stored);
    assert_eq!(again.started_from().version, 2);
    assert_eq!(again.versions().root, 2);

    // Starting from the image's root alone, the new keys are not trusted.
    let fresh = Node::new(&repo.first_root());
    let error = fresh.file_client(&repo).load().await.unwrap_err();
    assert!(
        matches!(&error, TufError::Signature { role, .. } if role == "timestamp"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_newer_image_root_wins_over_an_older_stored_root() {
    let mut repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let client = node.file_client(&repo);
    client.load().await.unwrap();
    repo.rotate_root();
    repo.publish().await;
    // An image update brought root version 2; the node stored version 1.
    fs::copy(repo.metadata_dir().join("2.root.json"), node.image_root()).unwrap();
    let trusted = client.trusted_root().unwrap();
    assert_eq!((trusted.source, trusted.version), (RootSource::Image, 2));
    let repository = client.load().await.unwrap();
    assert_eq!(repository.started_from().version, 2);
}

#[tokio::test]
async fn a_corrupt_stored_root_falls_back_to_the_image_root() {
    let repo = TestRepo::new().await;
    let node = Node::new(&repo.first_root());
    let client = node.file_client(&repo);
    client.load().await.unwrap();
    fs::write(node.datastore().join("root.json"), b"{\"truncated").unwrap();
    let repository = client.load().await.unwrap();
    assert_eq!(repository.started_from().source, RootSource::Image);
}

// ---------------------------------------------------------------------------
// The conformance CLI.

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_racklet-tuf-conformance"))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// A client's directories, driven the way the test suite drives them.
struct CliClient {
    directory: TempDir,
}

impl CliClient {
    fn new() -> CliClient {
        let directory = tempfile::tempdir().unwrap();
        fs::create_dir(directory.path().join("metadata")).unwrap();
        fs::create_dir(directory.path().join("targets")).unwrap();
        CliClient { directory }
    }

    fn metadata_dir(&self) -> PathBuf {
        self.directory.path().join("metadata")
    }

    fn target_dir(&self) -> PathBuf {
        self.directory.path().join("targets")
    }

    fn init(&self, root: &Path) -> Output {
        cli()
            .arg("--metadata-dir")
            .arg(self.metadata_dir())
            .arg("init")
            .arg(root)
            .output()
            .unwrap()
    }

    fn refresh(&self, server: &HttpServer) -> Output {
        cli()
            .args(["--metadata-url", server.url("metadata").as_str()])
            .arg("--metadata-dir")
            .arg(self.metadata_dir())
            .arg("refresh")
            .output()
            .unwrap()
    }

    fn download(&self, server: &HttpServer, names: &[&str]) -> Output {
        let mut command = cli();
        command
            .args(["--metadata-url", server.url("metadata").as_str()])
            .arg("--metadata-dir")
            .arg(self.metadata_dir());
        for name in names {
            command.args(["--target-name", name]);
        }
        command
            .arg("--target-dir")
            .arg(self.target_dir())
            .args(["--target-base-url", server.url("targets").as_str()])
            .arg("download")
            .output()
            .unwrap()
    }

    fn metadata(&self, file: &str) -> Vec<u8> {
        fs::read(self.metadata_dir().join(file)).unwrap()
    }

    fn json_files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.metadata_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".json"))
            .collect();
        names.sort();
        names
    }

    fn version(&self, role: &str) -> u64 {
        let value: Value = serde_json::from_slice(&self.metadata(&format!("{role}.json"))).unwrap();
        value["signed"]["version"].as_u64().unwrap()
    }
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn cli_init_refresh_keeps_the_served_bytes() {
    let repo = block_on(TestRepo::new());
    let server = HttpServer::serve(&repo.base);
    let client = CliClient::new();
    assert_exit(&client.init(&repo.first_root()), 0);
    assert!(server.requests().is_empty(), "init makes no requests");
    assert_eq!(client.metadata("root.json"), repo.metadata("1.root.json"));

    assert_exit(&client.refresh(&server), 0);
    assert_eq!(
        client.json_files(),
        [
            "root.json",
            "snapshot.json",
            "targets.json",
            "timestamp.json"
        ]
    );
    assert_eq!(client.metadata("root.json"), repo.metadata("1.root.json"));
    assert_eq!(
        client.metadata("timestamp.json"),
        repo.metadata("timestamp.json")
    );
    assert_eq!(
        client.metadata("snapshot.json"),
        repo.metadata("1.snapshot.json")
    );
    assert_eq!(
        client.metadata("targets.json"),
        repo.metadata("1.targets.json")
    );
    // Metadata only: no target was fetched.
    assert!(
        server
            .requests()
            .iter()
            .all(|request| request.starts_with("/metadata/")),
        "{:?}",
        server.requests()
    );
}

#[test]
fn cli_refresh_follows_a_rotation_and_refuses_a_replay() {
    let mut repo = block_on(TestRepo::new());
    let server = HttpServer::serve(&repo.base);
    let client = CliClient::new();
    assert_exit(&client.init(&repo.first_root()), 0);
    assert_exit(&client.refresh(&server), 0);
    let old_timestamp = repo.metadata("timestamp.json");

    repo.rotate_root();
    block_on(repo.publish());
    assert_exit(&client.refresh(&server), 0);
    assert_eq!(client.metadata("root.json"), repo.metadata("2.root.json"));
    assert_eq!(client.version("timestamp"), 2);

    repo.rotate_root();
    block_on(repo.publish());
    assert_exit(&client.refresh(&server), 0);
    assert_eq!(client.version("root"), 3);
    assert_eq!(client.version("timestamp"), 3);
    let trusted_timestamp = client.metadata("timestamp.json");

    // A newer timestamp signed by the current key, then the older one again.
    block_on(repo.publish());
    let newer = repo.metadata("timestamp.json");
    fs::write(
        repo.metadata_dir().join("timestamp.json"),
        &trusted_timestamp,
    )
    .unwrap();
    assert_exit(&client.refresh(&server), 0);
    fs::write(repo.metadata_dir().join("timestamp.json"), &newer).unwrap();
    assert_exit(&client.refresh(&server), 0);
    assert_eq!(client.version("timestamp"), 4);
    fs::write(
        repo.metadata_dir().join("timestamp.json"),
        &trusted_timestamp,
    )
    .unwrap();
    let output = client.refresh(&server);
    assert_exit(&output, 1);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("rollback"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        client.metadata("timestamp.json"),
        newer,
        "the trusted timestamp stays"
    );

    // Signed by a key the current root no longer trusts: refused too.
    fs::write(repo.metadata_dir().join("timestamp.json"), &old_timestamp).unwrap();
    assert_exit(&client.refresh(&server), 1);
    assert_eq!(client.version("timestamp"), 4);
}

#[test]
fn cli_download_stores_the_target_and_skips_it_when_present() {
    let repo = block_on(TestRepo::new());
    let server = HttpServer::serve(&repo.base);
    let client = CliClient::new();
    assert_exit(&client.init(&repo.first_root()), 0);
    let target_url = format!("/targets/{}.{PAYLOAD}", sha256_hex(&repo.targets[PAYLOAD]));

    assert_exit(&client.download(&server, &[PAYLOAD, MANIFEST]), 0);
    let stored = client.target_dir().join(PAYLOAD);
    assert_eq!(fs::read(&stored).unwrap(), repo.targets[PAYLOAD]);
    assert_eq!(
        fs::read(client.target_dir().join(MANIFEST)).unwrap(),
        repo.targets[MANIFEST]
    );
    assert_eq!(server.count(&target_url), 1);
    assert_eq!(client.version("timestamp"), 1, "download refreshes first");

    // Already there with the signed hash: not fetched again.
    assert_exit(&client.download(&server, &[PAYLOAD]), 0);
    assert_eq!(server.count(&target_url), 1);

    // Changed locally: fetched again into the same file name.
    fs::write(&stored, b"something else").unwrap();
    assert_exit(&client.download(&server, &[PAYLOAD]), 0);
    assert_eq!(server.count(&target_url), 2);
    assert_eq!(fs::read(&stored).unwrap(), repo.targets[PAYLOAD]);
    let files: Vec<_> = fs::read_dir(client.target_dir()).unwrap().collect();
    assert_eq!(files.len(), 2, "no temporary files left behind");
}

#[test]
fn cli_download_failures_exit_1_and_leave_nothing() {
    let repo = block_on(TestRepo::new());
    let server = HttpServer::serve(&repo.base);
    let client = CliClient::new();
    assert_exit(&client.init(&repo.first_root()), 0);

    let output = client.download(&server, &["not-listed.bin"]);
    assert_exit(&output, 1);
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-listed.bin"));

    let path = repo.target_path(PAYLOAD);
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let output = client.download(&server, &[PAYLOAD]);
    assert_exit(&output, 1);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("sha256"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::read_dir(client.target_dir()).unwrap().count(),
        0,
        "nothing unverified is kept"
    );
}

#[test]
fn cli_usage_errors_exit_1() {
    let client = CliClient::new();
    let output = cli()
        .arg("--metadata-dir")
        .arg(client.metadata_dir())
        .arg("refresh")
        .output()
        .unwrap();
    assert_exit(&output, 1);
    assert!(String::from_utf8_lossy(&output.stderr).contains("--metadata-url"));
    assert_exit(&cli().arg("frobnicate").output().unwrap(), 1);
    assert_exit(&cli().arg("--help").output().unwrap(), 0);
    // No trusted root yet.
    let output = cli()
        .arg("--metadata-dir")
        .arg(client.metadata_dir())
        .args(["--metadata-url", "http://127.0.0.1:9/metadata/", "refresh"])
        .output()
        .unwrap();
    assert_exit(&output, 1);
}
