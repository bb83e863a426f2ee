//! The TUF client workflow (specification 1.0.x, section 5, "Detailed client
//! workflow"), written for the agent on top of tough's key and signature
//! types: root rotation (5.3), timestamp (5.4), snapshot (5.5), top-level
//! targets (5.6) and the delegation search (5.6.7), with the checks in the
//! spec's order.
//!
//! Metadata is read from the served bytes: signatures are checked over the
//! canonical JSON of the `signed` object as served (not over a
//! re-serialisation of parsed types), and each role's file in the store is
//! exactly the bytes that verified. Unknown fields are kept by construction,
//! unknown key types and hash algorithms are skipped (a key that cannot be
//! used does not count towards a threshold; a target needs at least one hash
//! this client can compute, and every one it can compute must match).
//!
//! The store is a directory: `root.json`, `timestamp.json`, `snapshot.json`,
//! `targets.json`, and delegated roles as `<quoted name>.json`
//! ([`role_file_name`]). A role's local copy is used instead of a download
//! when it still verifies with the current keys, has the version the
//! metadata above it names and has not expired; a local copy that verifies
//! but is stale is kept as the reference for the rollback checks. A local
//! copy that no longer verifies (its keys were rotated: the spec's
//! fast-forward recovery) is ignored.
//!
//! The decisions are pure functions with their own tests:
//! [`timestamp_decision`], [`snapshot_rollback`], [`DelegationSearch`] (the
//! pre-order depth-first search with terminating delegations),
//! [`path_pattern_matches`] and [`TargetCheck`] (a target's length and
//! hashes as bytes arrive).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use sha2::Digest;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{RoleKeys, RoleType, Root, Signature, Signed};
use tough::{Transport, TransportErrorKind};
use url::Url;

use crate::tuf::TufError;

/// The most root versions one refresh follows (python-tuf's default).
pub const MAX_ROOT_ROTATIONS: u64 = 32;
/// The most roles one target search visits, the top-level targets included.
pub const MAX_DELEGATIONS: usize = 32;
/// Download limits for metadata whose length nothing signed names.
pub const ROOT_MAX_LENGTH: u64 = 512_000;
pub const TIMESTAMP_MAX_LENGTH: u64 = 16_384;
pub const SNAPSHOT_MAX_LENGTH: u64 = 2_000_000;
pub const TARGETS_MAX_LENGTH: u64 = 5_000_000;

/// The names of the top-level roles (no delegated role may take one).
pub const TOP_LEVEL_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

// ---------------------------------------------------------------------------
// Names and URLs.

/// A name quoted as one URL path segment or file name: everything but ASCII
/// letters, digits and `-_.~` percent-encoded (python's `quote(name, "")`).
pub fn quote(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            quoted.push(char::from(byte));
        } else {
            quoted.push_str(&format!("%{byte:02X}"));
        }
    }
    quoted
}

/// The file a role's metadata is kept in, in the store (and in the
/// conformance client's metadata directory): `<quoted name>.json`, a leading
/// dot encoded so that it is never a hidden (temporary) file.
pub fn role_file_name(role: &str) -> String {
    let quoted = quote(role);
    match quoted.strip_prefix('.') {
        Some(rest) => format!("%2E{rest}.json"),
        None => format!("{quoted}.json"),
    }
}

/// `base` joined with one more path part (already quoted).
fn join_url(base: &Url, path: &str) -> Result<Url, String> {
    let mut text = base.as_str().to_string();
    if let Some(cut) = text.find(['?', '#']) {
        text.truncate(cut);
    }
    if !text.ends_with('/') {
        text.push('/');
    }
    text.push_str(path);
    Url::parse(&text).map_err(|error| format!("{text}: {error}"))
}

/// Where a target is downloaded from: `base/NAME`, or with consistent
/// snapshots `base/DIR/HASH.FILE` (spec 5.7.3), each path segment quoted.
/// Names with empty, `.` or `..` segments are refused.
pub fn target_url(base: &Url, name: &str, consistent_hash: Option<&str>) -> Result<Url, TufError> {
    let invalid = |reason: &str| TufError::InvalidTargetName {
        target: name.to_string(),
        reason: reason.to_string(),
    };
    let segments: Vec<&str> = name.split('/').collect();
    if segments
        .iter()
        .any(|segment| segment.is_empty() || *segment == "." || *segment == "..")
    {
        return Err(invalid("empty, `.` or `..` path segment"));
    }
    let last = segments.len() - 1;
    let mut path = Vec::with_capacity(segments.len());
    for (index, segment) in segments.iter().enumerate() {
        match consistent_hash {
            Some(hash) if index == last => path.push(format!("{}.{}", quote(hash), quote(segment))),
            _ => path.push(quote(segment)),
        }
    }
    join_url(base, &path.join("/")).map_err(|message| TufError::InvalidTargetUrl {
        target: name.to_string(),
        message,
    })
}

// ---------------------------------------------------------------------------
// Metadata as served.

/// A metadata file: its bytes, its `signed` object and its signatures.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub raw: Vec<u8>,
    signed: Value,
    signatures: Vec<RawSignature>,
}

#[derive(Clone, Debug, Deserialize)]
struct RawSignature {
    keyid: String,
    sig: String,
}

#[derive(Deserialize)]
struct RawEnvelope {
    signed: Value,
    signatures: Vec<RawSignature>,
}

impl Envelope {
    /// Parse `raw` as metadata of `role` (expected `_type`: `kind`).
    pub fn parse(role: &str, kind: &str, raw: Vec<u8>) -> Result<Envelope, TufError> {
        let envelope: RawEnvelope =
            serde_json::from_slice(&raw).map_err(|error| invalid(role, error))?;
        let found = envelope.signed.get("_type").and_then(Value::as_str);
        if found != Some(kind) {
            return Err(invalid(
                role,
                format!("_type is {found:?}, expected \"{kind}\""),
            ));
        }
        Ok(Envelope {
            raw,
            signed: envelope.signed,
            signatures: envelope.signatures,
        })
    }

    fn fields<T: serde::de::DeserializeOwned>(&self, role: &str) -> Result<T, TufError> {
        serde_json::from_value(self.signed.clone()).map_err(|error| invalid(role, error))
    }
}

fn invalid(role: &str, reason: impl ToString) -> TufError {
    TufError::InvalidMetadata {
        role: role.to_string(),
        reason: reason.to_string(),
    }
}

/// The fields every role has.
#[derive(Clone, Debug, Deserialize)]
struct Common {
    spec_version: String,
    version: u64,
    expires: String,
}

impl Common {
    fn check(self, role: &str) -> Result<(u64, jiff::Timestamp), TufError> {
        if self.spec_version.split('.').next() != Some("1") {
            return Err(invalid(
                role,
                format!("unsupported spec_version {}", self.spec_version),
            ));
        }
        if self.version == 0 {
            return Err(invalid(role, "version 0 (versions start at 1)"));
        }
        let expires = self
            .expires
            .parse()
            .map_err(|error| invalid(role, format!("expires {:?}: {error}", self.expires)))?;
        Ok((self.version, expires))
    }
}

/// The keys allowed to sign a role, and how many must.
#[derive(Clone, Debug, Deserialize)]
pub struct RoleKeyIds {
    pub keyids: Vec<String>,
    pub threshold: u64,
}

/// A file a timestamp or snapshot lists.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MetaFile {
    pub version: u64,
    #[serde(default)]
    pub length: Option<u64>,
    #[serde(default)]
    pub hashes: Option<BTreeMap<String, String>>,
}

/// A target as the targets metadata lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TargetFile {
    pub length: u64,
    pub hashes: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DelegatedRole {
    pub name: String,
    pub keyids: Vec<String>,
    pub threshold: u64,
    #[serde(default)]
    pub terminating: bool,
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    #[serde(default)]
    pub path_hash_prefixes: Option<Vec<String>>,
}

impl DelegatedRole {
    /// Whether this delegation covers `target` (pure).
    pub fn covers(&self, target: &str) -> bool {
        if let Some(patterns) = &self.paths {
            return patterns
                .iter()
                .any(|pattern| path_pattern_matches(pattern, target));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            let digest = hex::encode(sha2::Sha256::digest(target.as_bytes()));
            return prefixes.iter().any(|prefix| digest.starts_with(prefix));
        }
        false
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Delegations {
    pub keys: BTreeMap<String, Value>,
    pub roles: Vec<DelegatedRole>,
}

#[derive(Clone, Debug)]
pub struct RootMeta {
    pub version: u64,
    pub expires: jiff::Timestamp,
    pub consistent_snapshot: bool,
    pub keys: BTreeMap<String, Value>,
    pub roles: BTreeMap<String, RoleKeyIds>,
}

#[derive(Clone, Debug)]
pub struct TimestampMeta {
    pub version: u64,
    pub expires: jiff::Timestamp,
    pub snapshot: MetaFile,
}

#[derive(Clone, Debug)]
pub struct SnapshotMeta {
    pub version: u64,
    pub expires: jiff::Timestamp,
    pub meta: BTreeMap<String, MetaFile>,
}

#[derive(Clone, Debug)]
pub struct TargetsMeta {
    pub version: u64,
    pub expires: jiff::Timestamp,
    pub targets: BTreeMap<String, TargetFile>,
    pub delegations: Option<Delegations>,
}

/// Metadata of one role that verified, with the bytes it came in.
#[derive(Clone, Debug)]
pub struct Verified<T> {
    pub envelope: Envelope,
    pub meta: T,
}

impl RootMeta {
    fn parse(envelope: &Envelope) -> Result<RootMeta, TufError> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(flatten)]
            common: Common,
            #[serde(default)]
            consistent_snapshot: bool,
            keys: BTreeMap<String, Value>,
            roles: BTreeMap<String, RoleKeyIds>,
        }
        let fields: Fields = envelope.fields("root")?;
        let (version, expires) = fields.common.check("root")?;
        for role in TOP_LEVEL_ROLES {
            if !fields.roles.contains_key(role) {
                return Err(invalid("root", format!("no keys for the {role} role")));
            }
        }
        Ok(RootMeta {
            version,
            expires,
            consistent_snapshot: fields.consistent_snapshot,
            keys: fields.keys,
            roles: fields.roles,
        })
    }

    fn role(&self, role: &str) -> &RoleKeyIds {
        // parse() checked that every top-level role is there.
        &self.roles[role]
    }

    /// Verify `envelope` as the top-level `role` this root names keys for.
    fn verify(&self, role: &str, envelope: &Envelope) -> Result<(), TufError> {
        verify_threshold(role, envelope, &self.keys, self.role(role))
    }
}

impl TimestampMeta {
    fn parse(envelope: &Envelope) -> Result<TimestampMeta, TufError> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(flatten)]
            common: Common,
            meta: BTreeMap<String, MetaFile>,
        }
        let mut fields: Fields = envelope.fields("timestamp")?;
        let (version, expires) = fields.common.check("timestamp")?;
        let snapshot = fields
            .meta
            .remove("snapshot.json")
            .ok_or_else(|| invalid("timestamp", "it lists no snapshot.json"))?;
        Ok(TimestampMeta {
            version,
            expires,
            snapshot,
        })
    }
}

impl SnapshotMeta {
    fn parse(envelope: &Envelope) -> Result<SnapshotMeta, TufError> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(flatten)]
            common: Common,
            meta: BTreeMap<String, MetaFile>,
        }
        let fields: Fields = envelope.fields("snapshot")?;
        let (version, expires) = fields.common.check("snapshot")?;
        Ok(SnapshotMeta {
            version,
            expires,
            meta: fields.meta,
        })
    }
}

impl TargetsMeta {
    fn parse(role: &str, envelope: &Envelope) -> Result<TargetsMeta, TufError> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(flatten)]
            common: Common,
            targets: BTreeMap<String, TargetFile>,
            #[serde(default)]
            delegations: Option<Delegations>,
        }
        let fields: Fields = envelope.fields(role)?;
        let (version, expires) = fields.common.check(role)?;
        if let Some(delegations) = &fields.delegations {
            let mut names = HashSet::new();
            for delegated in &delegations.roles {
                if TOP_LEVEL_ROLES.contains(&delegated.name.as_str()) {
                    return Err(invalid(
                        role,
                        format!("delegates to a top-level role name {:?}", delegated.name),
                    ));
                }
                if !names.insert(delegated.name.as_str()) {
                    return Err(invalid(
                        role,
                        format!("delegates to {:?} twice", delegated.name),
                    ));
                }
                if delegated.paths.is_some() && delegated.path_hash_prefixes.is_some() {
                    return Err(invalid(
                        role,
                        format!(
                            "delegation {:?} has both paths and path_hash_prefixes",
                            delegated.name
                        ),
                    ));
                }
            }
        }
        Ok(TargetsMeta {
            version,
            expires,
            targets: fields.targets,
            delegations: fields.delegations,
        })
    }
}

// ---------------------------------------------------------------------------
// Signatures.

/// The served `signed` object, for tough's verifier (which signs over the
/// canonical JSON of whatever it is given).
struct RawSigned<'a>(&'a Value);

impl Serialize for RawSigned<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl tough::schema::Role for RawSigned<'_> {
    const TYPE: RoleType = RoleType::Targets;

    fn expires(&self) -> jiff::Timestamp {
        jiff::Timestamp::MAX
    }

    fn version(&self) -> NonZeroU64 {
        NonZeroU64::MIN
    }

    fn filename(&self, _consistent_snapshot: bool) -> String {
        String::new()
    }
}

/// Check that `envelope` carries valid signatures of at least `allowed.threshold`
/// distinct keys of `allowed.keyids` (keys from `keys`). A key whose type or
/// scheme tough cannot use, and a signature that is not hex, count for nothing;
/// two signatures with the same key ID are refused.
pub fn verify_threshold(
    role: &str,
    envelope: &Envelope,
    keys: &BTreeMap<String, Value>,
    allowed: &RoleKeyIds,
) -> Result<(), TufError> {
    let refuse = |reason: String| TufError::Signature {
        role: role.to_string(),
        reason,
    };
    let threshold = NonZeroU64::new(allowed.threshold)
        .ok_or_else(|| invalid(role, "threshold 0 for its keys"))?;
    // Key IDs go to tough as their bytes, so any string works as an ID.
    let id = |keyid: &str| -> Decoded<Hex> { keyid.as_bytes().to_vec().into() };
    let mut usable = HashMap::new();
    let mut keyids = Vec::new();
    for keyid in &allowed.keyids {
        if keyids.contains(&id(keyid)) {
            continue;
        }
        let Some(key) = keys.get(keyid) else { continue };
        match serde_json::from_value::<tough::schema::key::Key>(key.clone()) {
            Ok(key) => {
                usable.insert(id(keyid), key);
                keyids.push(id(keyid));
            }
            Err(error) => tracing::debug!(role, keyid, %error, "skipping a key tough cannot use"),
        }
    }
    let signatures = envelope
        .signatures
        .iter()
        .filter_map(|signature| {
            Some(Signature {
                keyid: id(&signature.keyid),
                sig: signature.sig.parse().ok()?,
            })
        })
        .collect();
    let verifier = Root {
        spec_version: "1.0.0".to_string(),
        consistent_snapshot: false,
        version: NonZeroU64::MIN,
        expires: jiff::Timestamp::MAX,
        keys: usable,
        roles: HashMap::from([(
            RoleType::Targets,
            RoleKeys {
                keyids,
                threshold,
                _extra: HashMap::new(),
            },
        )]),
        _extra: HashMap::new(),
    };
    let signed = Signed {
        signed: RawSigned(&envelope.signed),
        signatures,
    };
    verifier.verify_role(&signed).map_err(|error| {
        refuse(format!(
            "{} (threshold {} of {} key IDs)",
            error,
            allowed.threshold,
            allowed.keyids.len()
        ))
    })
}

// ---------------------------------------------------------------------------
// Pure decisions.

/// What to do with a newly downloaded timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampDecision {
    /// Trust the new one (persist it).
    UseNew,
    /// The same version as the trusted one: keep the trusted one (its bytes
    /// are what signed metadata said at that version), do not persist.
    KeepTrusted,
}

/// Spec 5.4.3-5.4.4 (pure): `trusted` and `new` are (version, snapshot
/// version). An older timestamp, or one naming an older snapshot, is a
/// rollback: `Err((role, trusted version, offered version))`.
pub fn timestamp_decision(
    trusted: Option<(u64, u64)>,
    new: (u64, u64),
) -> Result<TimestampDecision, (&'static str, u64, u64)> {
    let Some((version, snapshot)) = trusted else {
        return Ok(TimestampDecision::UseNew);
    };
    if new.0 < version {
        return Err(("timestamp", version, new.0));
    }
    if new.0 == version {
        return Ok(TimestampDecision::KeepTrusted);
    }
    if new.1 < snapshot {
        return Err(("snapshot", snapshot, new.1));
    }
    Ok(TimestampDecision::UseNew)
}

/// A rollback found in a new snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRollback {
    pub file: String,
    pub trusted_version: u64,
    /// `None`: the new snapshot no longer lists the file.
    pub offered_version: Option<u64>,
}

/// Spec 5.5.5 (pure): every file the trusted snapshot lists must still be
/// listed, at the same or a higher version.
pub fn snapshot_rollback(
    trusted: &BTreeMap<String, MetaFile>,
    new: &BTreeMap<String, MetaFile>,
) -> Result<(), SnapshotRollback> {
    for (file, old) in trusted {
        match new.get(file) {
            Some(offered) if offered.version >= old.version => {}
            offered => {
                return Err(SnapshotRollback {
                    file: file.clone(),
                    trusted_version: old.version,
                    offered_version: offered.map(|meta| meta.version),
                })
            }
        }
    }
    Ok(())
}

/// One shell-style pattern segment against one path segment: `*` (any run),
/// `?` (one character), `[...]`/`[!...]` (a class, with ranges), anything
/// else literally; case-sensitive.
fn segment_matches(pattern: &[char], text: &[char]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some('*') => (0..=text.len()).any(|skip| segment_matches(&pattern[1..], &text[skip..])),
        Some('?') => !text.is_empty() && segment_matches(&pattern[1..], &text[1..]),
        Some('[') => match (class_matches(&pattern[1..], text.first().copied()), text) {
            (Some((matched, rest)), [_, tail @ ..]) => {
                matched && segment_matches(&pattern[1 + rest..], tail)
            }
            // No closing bracket: a literal `[`.
            (None, [first, tail @ ..]) => *first == '[' && segment_matches(&pattern[1..], tail),
            _ => false,
        },
        Some(literal) => {
            text.first() == Some(literal) && segment_matches(&pattern[1..], &text[1..])
        }
    }
}

/// A bracket class (`pattern` starts after `[`): whether `character` is in
/// it and how many pattern characters it took (with the closing `]`).
fn class_matches(pattern: &[char], character: Option<char>) -> Option<(bool, usize)> {
    let mut index = 0;
    let negated = matches!(pattern.first(), Some('!'));
    if negated {
        index += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let current = *pattern.get(index)?;
        if current == ']' && !first {
            let matched = character.is_some_and(|_| found != negated);
            return Some((matched, index + 1));
        }
        first = false;
        if pattern.get(index + 1) == Some(&'-')
            && pattern.get(index + 2).is_some_and(|end| *end != ']')
        {
            let end = pattern[index + 2];
            if character.is_some_and(|c| current <= c && c <= end) {
                found = true;
            }
            index += 3;
        } else {
            if character == Some(current) {
                found = true;
            }
            index += 1;
        }
    }
}

/// Spec 4.5 `PATHPATTERN` (pure): the pattern and the target have the same
/// number of `/`-separated segments and each segment matches shell-style
/// (a wildcard never matches a `/`).
pub fn path_pattern_matches(pattern: &str, target: &str) -> bool {
    let patterns: Vec<&str> = pattern.split('/').collect();
    let names: Vec<&str> = target.split('/').collect();
    patterns.len() == names.len()
        && patterns.iter().zip(&names).all(|(pattern, name)| {
            let pattern: Vec<char> = pattern.chars().collect();
            let name: Vec<char> = name.chars().collect();
            segment_matches(&pattern, &name)
        })
}

/// A role the delegation search visits next, and the role that delegated it
/// (`None` for the top-level targets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchStep {
    pub role: String,
    pub delegator: Option<String>,
}

/// The delegation search of spec 5.6.7 (pure): pre-order depth-first, each
/// role's delegations in the order listed, a role visited at most once, a
/// terminating delegation ending the search outside its own subtree, at most
/// `budget` roles.
#[derive(Debug)]
pub struct DelegationSearch {
    stack: Vec<SearchStep>,
    visited: HashSet<String>,
    budget: usize,
}

impl DelegationSearch {
    pub fn new(budget: usize) -> DelegationSearch {
        DelegationSearch {
            stack: vec![SearchStep {
                role: "targets".to_string(),
                delegator: None,
            }],
            visited: HashSet::new(),
            budget,
        }
    }

    /// The next role to look the target up in.
    pub fn next_step(&mut self) -> Option<SearchStep> {
        while let Some(step) = self.stack.pop() {
            if self.visited.contains(&step.role) {
                continue;
            }
            if self.visited.len() >= self.budget {
                tracing::warn!(
                    budget = self.budget,
                    "the target search stopped after visiting its limit of roles"
                );
                return None;
            }
            self.visited.insert(step.role.clone());
            return Some(step);
        }
        None
    }

    /// The target was not in `delegator`: queue its delegations, given as
    /// (name, terminating, covers the target), in their listed order.
    pub fn expand<'a>(
        &mut self,
        delegator: &str,
        delegations: impl IntoIterator<Item = (&'a str, bool, bool)>,
    ) {
        let mut children = Vec::new();
        for (name, terminating, covers) in delegations {
            if !covers {
                continue;
            }
            children.push(SearchStep {
                role: name.to_string(),
                delegator: Some(delegator.to_string()),
            });
            if terminating {
                self.stack.clear();
                break;
            }
        }
        children.reverse();
        self.stack.extend(children);
    }
}

// ---------------------------------------------------------------------------
// Hashes and targets.

/// A hash this client can compute.
#[derive(Clone, Debug)]
enum Hasher {
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: &str) -> Option<Hasher> {
        Some(match algorithm {
            "sha224" => Hasher::Sha224(Default::default()),
            "sha256" => Hasher::Sha256(Default::default()),
            "sha384" => Hasher::Sha384(Default::default()),
            "sha512" => Hasher::Sha512(Default::default()),
            _ => return None,
        })
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha224(hasher) => hasher.update(bytes),
            Hasher::Sha256(hasher) => hasher.update(bytes),
            Hasher::Sha384(hasher) => hasher.update(bytes),
            Hasher::Sha512(hasher) => hasher.update(bytes),
        }
    }

    fn hex(self) -> String {
        match self {
            Hasher::Sha224(hasher) => hex::encode(hasher.finalize()),
            Hasher::Sha256(hasher) => hex::encode(hasher.finalize()),
            Hasher::Sha384(hasher) => hex::encode(hasher.finalize()),
            Hasher::Sha512(hasher) => hex::encode(hasher.finalize()),
        }
    }
}

/// The hash a consistent-snapshot target URL is named by: sha256 when
/// listed, else the first (by name) this client can compute, else the first.
pub fn naming_hash(hashes: &BTreeMap<String, String>) -> Option<&str> {
    hashes
        .get("sha256")
        .or_else(|| {
            hashes
                .iter()
                .find(|(algorithm, _)| Hasher::new(algorithm).is_some())
                .map(|(_, hash)| hash)
        })
        .or_else(|| hashes.values().next())
        .map(String::as_str)
}

/// Checks a file's bytes as they arrive against a signed length and hashes:
/// [`TargetCheck::update`] fails as soon as there are more bytes than signed,
/// [`TargetCheck::finish`] checks the length and every hash it can compute.
#[derive(Debug)]
pub struct TargetCheck {
    what: String,
    length: u64,
    seen: u64,
    hashes: Vec<(String, String, Hasher)>,
}

impl TargetCheck {
    /// A check of target `what`; it must list a hash this client computes.
    pub fn new(
        what: &str,
        length: u64,
        hashes: &BTreeMap<String, String>,
    ) -> Result<TargetCheck, TufError> {
        let hashes: Vec<_> = hashes
            .iter()
            .filter_map(|(algorithm, expected)| {
                Some((
                    algorithm.clone(),
                    expected.to_ascii_lowercase(),
                    Hasher::new(algorithm)?,
                ))
            })
            .collect();
        if hashes.is_empty() {
            return Err(TufError::TargetMismatch {
                target: what.to_string(),
                reason: "no hash this client can check is signed (sha224, sha256, sha384, sha512)"
                    .to_string(),
            });
        }
        Ok(TargetCheck {
            what: what.to_string(),
            length,
            seen: 0,
            hashes,
        })
    }

    fn mismatch(&self, reason: String) -> TufError {
        TufError::TargetMismatch {
            target: self.what.clone(),
            reason,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) -> Result<(), TufError> {
        let seen = self.seen.saturating_add(bytes.len() as u64);
        if seen > self.length {
            return Err(self.mismatch(format!(
                "longer than its signed length of {} bytes",
                self.length
            )));
        }
        self.seen = seen;
        for (_, _, hasher) in &mut self.hashes {
            hasher.update(bytes);
        }
        Ok(())
    }

    pub fn finish(self) -> Result<(), TufError> {
        if self.seen != self.length {
            return Err(self.mismatch(format!(
                "ended after {} of its signed length of {} bytes",
                self.seen, self.length
            )));
        }
        for (algorithm, expected, hasher) in self.hashes {
            let found = hasher.hex();
            if found != expected {
                return Err(TufError::TargetMismatch {
                    target: self.what,
                    reason: format!("{algorithm} hash is {found}, signed {expected}"),
                });
            }
        }
        Ok(())
    }
}

/// Whether `reader` yields exactly the signed target (`false` on a mismatch).
pub fn reader_matches(
    mut reader: impl Read,
    length: u64,
    hashes: &BTreeMap<String, String>,
) -> io::Result<bool> {
    let Ok(mut check) = TargetCheck::new("", length, hashes) else {
        return Ok(false);
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let count = reader.read(&mut buffer)?;
        if count == 0 {
            return Ok(check.finish().is_ok());
        }
        if check.update(&buffer[..count]).is_err() {
            return Ok(false);
        }
    }
}

/// Spec 5.5.2/5.6.2: metadata bytes against the length and hashes that the
/// metadata listing them gives (each optional).
fn check_meta_bytes(role: &str, raw: &[u8], meta: &MetaFile) -> Result<(), TufError> {
    if let Some(length) = meta.length {
        if raw.len() as u64 != length {
            return Err(invalid(
                role,
                format!("{} bytes, its signed length is {length}", raw.len()),
            ));
        }
    }
    if let Some(hashes) = &meta.hashes {
        let mut checked = false;
        for (algorithm, expected) in hashes {
            let Some(mut hasher) = Hasher::new(algorithm) else {
                continue;
            };
            hasher.update(raw);
            let found = hasher.hex();
            if found != expected.to_ascii_lowercase() {
                return Err(invalid(
                    role,
                    format!("its {algorithm} hash is {found}, signed {expected}"),
                ));
            }
            checked = true;
        }
        if !checked {
            return Err(invalid(role, "no hash this client can check is signed"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Downloads.

/// A transport failure fetching `url`.
pub fn transport_error(url: &Url, source: tough::TransportError) -> TufError {
    TufError::Transport {
        url: url.to_string(),
        not_found: source.kind() == TransportErrorKind::FileNotFound,
        source: Box::new(source),
    }
}

/// Read a whole response, each chunk passed to `check` before it is kept.
pub async fn fetch_checked(
    transport: &dyn Transport,
    url: Url,
    mut check: impl FnMut(&[u8]) -> Result<(), TufError>,
) -> Result<Vec<u8>, TufError> {
    let stream = transport
        .fetch(url.clone())
        .await
        .map_err(|source| transport_error(&url, source))?;
    let mut stream = pin!(stream);
    let mut bytes = Vec::new();
    while let Some(chunk) = crate::tuf::next_item(stream.as_mut()).await {
        let chunk = chunk.map_err(|source| transport_error(&url, source))?;
        check(&chunk)?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Read a whole response of at most `limit` bytes.
pub async fn fetch_bounded(
    transport: &dyn Transport,
    url: Url,
    limit: u64,
    role: &str,
) -> Result<Vec<u8>, TufError> {
    let mut seen = 0u64;
    let too_long = format!("{url} is longer than the {limit} bytes allowed");
    fetch_checked(transport, url, |chunk| {
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > limit {
            return Err(invalid(role, &too_long));
        }
        Ok(())
    })
    .await
}

/// Where one refresh reads and writes: the repository and the store.
#[derive(Clone, Debug)]
pub struct Session {
    pub transport: Arc<dyn Transport>,
    pub metadata_url: Url,
    /// The directory of trusted metadata files.
    pub store: PathBuf,
}

impl Session {
    fn metadata_url(&self, file: &str) -> Result<Url, TufError> {
        join_url(&self.metadata_url, file).map_err(|reason| invalid(file, reason))
    }

    async fn fetch(&self, role: &str, file: &str, limit: u64) -> Result<Vec<u8>, TufError> {
        let url = self.metadata_url(file)?;
        tracing::debug!(role, %url, "fetching TUF metadata");
        fetch_bounded(self.transport.as_ref(), url, limit, role).await
    }

    fn read_local(&self, role: &str) -> Option<Vec<u8>> {
        std::fs::read(self.store.join(role_file_name(role))).ok()
    }

    fn write_local(&self, role: &str, raw: &[u8]) -> Result<(), TufError> {
        crate::state::atomic_write(self.store.join(role_file_name(role)), raw)?;
        Ok(())
    }
}

fn check_expiry(
    role: &str,
    expires: jiff::Timestamp,
    now: jiff::Timestamp,
) -> Result<(), TufError> {
    if now >= expires {
        return Err(TufError::Expired {
            role: role.to_string(),
            expires,
        });
    }
    Ok(())
}

/// The four top-level roles a refresh ends with.
#[derive(Clone, Debug)]
pub struct TopLevel {
    pub root: Verified<RootMeta>,
    pub timestamp: Verified<TimestampMeta>,
    pub snapshot: Verified<SnapshotMeta>,
    pub targets: Verified<TargetsMeta>,
}

/// Parse and check a trusted root (signed by its own threshold).
pub fn trusted_root(raw: Vec<u8>) -> Result<Verified<RootMeta>, TufError> {
    let envelope = Envelope::parse("root", "root", raw)?;
    let meta = RootMeta::parse(&envelope)?;
    meta.verify("root", &envelope)?;
    Ok(Verified { envelope, meta })
}

/// Spec 5.3-5.6: update the top-level metadata from `start` (a trusted
/// root), writing each file that verified into the store as it goes.
pub async fn refresh(
    session: &Session,
    start: Verified<RootMeta>,
    now: jiff::Timestamp,
) -> Result<TopLevel, TufError> {
    let root = update_root(session, start, now).await?;
    let timestamp = update_timestamp(session, &root, now).await?;
    let snapshot = update_snapshot(session, &root, &timestamp, now).await?;
    let targets_meta = snapshot
        .meta
        .meta
        .get("targets.json")
        .ok_or_else(|| invalid("snapshot", "it lists no targets.json"))?
        .clone();
    let targets = load_targets_role(
        session,
        "targets",
        &root.meta.keys,
        root.meta.role("targets"),
        &targets_meta,
        root.meta.consistent_snapshot,
        now,
    )
    .await?;
    Ok(TopLevel {
        root,
        timestamp,
        snapshot,
        targets,
    })
}

/// Spec 5.3: follow root versions N+1, N+2... until the repository has no
/// next one; each must be signed by the previous root's and its own
/// threshold and carry exactly the next version.
async fn update_root(
    session: &Session,
    start: Verified<RootMeta>,
    now: jiff::Timestamp,
) -> Result<Verified<RootMeta>, TufError> {
    let mut root = start;
    session.write_local("root", &root.envelope.raw)?;
    for _ in 0..MAX_ROOT_ROTATIONS {
        let next = root.meta.version + 1;
        let file = format!("{next}.root.json");
        let raw = match session.fetch("root", &file, ROOT_MAX_LENGTH).await {
            Ok(raw) => raw,
            Err(TufError::Transport {
                not_found: true, ..
            }) => break,
            Err(error) => return Err(error),
        };
        let envelope = Envelope::parse("root", "root", raw)?;
        let meta = RootMeta::parse(&envelope)?;
        root.meta.verify("root", &envelope).map_err(|error| {
            with_context(
                error,
                &format!(
                    "root version {next} by the keys of version {}",
                    root.meta.version
                ),
            )
        })?;
        meta.verify("root", &envelope).map_err(|error| {
            with_context(error, &format!("root version {next} by its own keys"))
        })?;
        if meta.version != next {
            return Err(invalid(
                "root",
                format!("{file} has version {}, expected {next}", meta.version),
            ));
        }
        session.write_local("root", &envelope.raw)?;
        tracing::info!(version = next, "followed a TUF root rotation");
        root = Verified { envelope, meta };
    }
    check_expiry("root", root.meta.expires, now)?;
    Ok(root)
}

fn with_context(error: TufError, context: &str) -> TufError {
    match error {
        TufError::Signature { role, reason } => TufError::Signature {
            role,
            reason: format!("{context}: {reason}"),
        },
        other => other,
    }
}

/// Local metadata of a role, if it parses and verifies with `verify`.
fn local<T>(
    session: &Session,
    role: &str,
    kind: &str,
    parse: impl FnOnce(&Envelope) -> Result<T, TufError>,
    verify: impl FnOnce(&Envelope) -> Result<(), TufError>,
) -> Option<Verified<T>> {
    let raw = session.read_local(role)?;
    let checked = Envelope::parse(role, kind, raw).and_then(|envelope| {
        let meta = parse(&envelope)?;
        verify(&envelope)?;
        Ok(Verified { envelope, meta })
    });
    match checked {
        Ok(verified) => Some(verified),
        Err(error) => {
            tracing::info!(role, %error, "ignoring the local metadata (it no longer verifies)");
            None
        }
    }
}

/// Spec 5.4.
async fn update_timestamp(
    session: &Session,
    root: &Verified<RootMeta>,
    now: jiff::Timestamp,
) -> Result<Verified<TimestampMeta>, TufError> {
    let trusted = local(
        session,
        "timestamp",
        "timestamp",
        TimestampMeta::parse,
        |envelope| root.meta.verify("timestamp", envelope),
    );
    let raw = session
        .fetch("timestamp", "timestamp.json", TIMESTAMP_MAX_LENGTH)
        .await?;
    let envelope = Envelope::parse("timestamp", "timestamp", raw)?;
    let meta = TimestampMeta::parse(&envelope)?;
    root.meta.verify("timestamp", &envelope)?;
    let decision = timestamp_decision(
        trusted
            .as_ref()
            .map(|trusted| (trusted.meta.version, trusted.meta.snapshot.version)),
        (meta.version, meta.snapshot.version),
    )
    .map_err(|(role, trusted_version, offered_version)| TufError::Rollback {
        role: role.to_string(),
        trusted_version: Some(trusted_version),
        offered_version: Some(offered_version),
        reason: format!(
            "the repository's timestamp names {role} version {offered_version}, older than the trusted version {trusted_version}"
        ),
    })?;
    let timestamp = match (decision, trusted) {
        (TimestampDecision::KeepTrusted, Some(trusted)) => trusted,
        _ => {
            check_expiry("timestamp", meta.expires, now)?;
            session.write_local("timestamp", &envelope.raw)?;
            Verified { envelope, meta }
        }
    };
    check_expiry("timestamp", timestamp.meta.expires, now)?;
    Ok(timestamp)
}

/// The name a role's metadata is served under (spec 5.5.1, 5.6.1).
fn consistent_file(role: &str, version: u64, consistent: bool) -> String {
    let file = format!("{}.json", quote(role));
    if consistent {
        format!("{version}.{file}")
    } else {
        file
    }
}

/// Spec 5.5.
async fn update_snapshot(
    session: &Session,
    root: &Verified<RootMeta>,
    timestamp: &Verified<TimestampMeta>,
    now: jiff::Timestamp,
) -> Result<Verified<SnapshotMeta>, TufError> {
    let listed = &timestamp.meta.snapshot;
    let trusted = local(
        session,
        "snapshot",
        "snapshot",
        SnapshotMeta::parse,
        |envelope| root.meta.verify("snapshot", envelope),
    );
    if let Some(trusted) = &trusted {
        if trusted.meta.version == listed.version && now < trusted.meta.expires {
            return Ok(trusted.clone());
        }
    }
    let file = consistent_file("snapshot", listed.version, root.meta.consistent_snapshot);
    let limit = listed.length.unwrap_or(SNAPSHOT_MAX_LENGTH);
    let raw = session.fetch("snapshot", &file, limit).await?;
    check_meta_bytes("snapshot", &raw, listed)?;
    let envelope = Envelope::parse("snapshot", "snapshot", raw)?;
    let meta = SnapshotMeta::parse(&envelope)?;
    root.meta.verify("snapshot", &envelope)?;
    if meta.version != listed.version {
        return Err(invalid(
            "snapshot",
            format!(
                "{file} has version {}, the timestamp names version {}",
                meta.version, listed.version
            ),
        ));
    }
    if let Some(trusted) = &trusted {
        snapshot_rollback(&trusted.meta.meta, &meta.meta).map_err(|rollback| {
            let role = rollback.file.trim_end_matches(".json").to_string();
            TufError::Rollback {
                reason: match rollback.offered_version {
                    Some(offered) => format!(
                        "snapshot version {} names {} version {offered}, older than the trusted version {}",
                        meta.version, rollback.file, rollback.trusted_version
                    ),
                    None => format!(
                        "snapshot version {} no longer lists {} (trusted version {})",
                        meta.version, rollback.file, rollback.trusted_version
                    ),
                },
                role,
                trusted_version: Some(rollback.trusted_version),
                offered_version: rollback.offered_version,
            }
        })?;
    }
    check_expiry("snapshot", meta.expires, now)?;
    session.write_local("snapshot", &envelope.raw)?;
    Ok(Verified { envelope, meta })
}

/// Spec 5.6 for the top-level targets and for a delegated role: the local
/// copy when it verifies with `keys`/`allowed`, has the version the snapshot
/// lists (`listed`) and has not expired, else a download checked against
/// the snapshot's length and hashes, the keys, the version and the expiry.
pub async fn load_targets_role(
    session: &Session,
    role: &str,
    keys: &BTreeMap<String, Value>,
    allowed: &RoleKeyIds,
    listed: &MetaFile,
    consistent_snapshot: bool,
    now: jiff::Timestamp,
) -> Result<Verified<TargetsMeta>, TufError> {
    let parse = |envelope: &Envelope| TargetsMeta::parse(role, envelope);
    let verify = |envelope: &Envelope| verify_threshold(role, envelope, keys, allowed);
    if let Some(trusted) = local(session, role, "targets", parse, verify) {
        if trusted.meta.version == listed.version && now < trusted.meta.expires {
            return Ok(trusted);
        }
    }
    let file = consistent_file(role, listed.version, consistent_snapshot);
    let limit = listed.length.unwrap_or(TARGETS_MAX_LENGTH);
    let raw = session.fetch(role, &file, limit).await?;
    check_meta_bytes(role, &raw, listed)?;
    let envelope = Envelope::parse(role, "targets", raw)?;
    let meta = parse(&envelope)?;
    verify(&envelope)?;
    if meta.version != listed.version {
        return Err(invalid(
            role,
            format!(
                "{file} has version {}, the snapshot names version {}",
                meta.version, listed.version
            ),
        ));
    }
    check_expiry(role, meta.expires, now)?;
    session.write_local(role, &envelope.raw)?;
    Ok(Verified { envelope, meta })
}

/// Whether `path` is a file this store keeps a role in (for copying the
/// trusted metadata elsewhere): `*.json`, not hidden.
pub fn is_role_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.ends_with(".json") && !name.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_as_one_segment() {
        assert_eq!(quote("targets"), "targets");
        assert_eq!(quote("../x"), "..%2Fx");
        assert_eq!(quote("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(role_file_name("?"), "%3F.json");
        assert_eq!(role_file_name("/delegatedrole"), "%2Fdelegatedrole.json");
        assert_eq!(role_file_name(".hidden"), "%2Ehidden.json");
        assert_eq!(role_file_name(".."), "%2E..json");
    }

    #[test]
    fn target_urls_put_the_hash_before_the_file_name() {
        let base = Url::parse("http://host/repo/targets").unwrap();
        assert_eq!(
            target_url(&base, "path/to/file.txt", Some("abc"))
                .unwrap()
                .as_str(),
            "http://host/repo/targets/path/to/abc.file.txt"
        );
        assert_eq!(
            target_url(&base, "a b?.txt", None).unwrap().as_str(),
            "http://host/repo/targets/a%20b%3F.txt"
        );
        for bad in ["../x", "a//b", "./a", "/a", "a/.."] {
            assert!(
                matches!(
                    target_url(&base, bad, None),
                    Err(TufError::InvalidTargetName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn path_patterns_match_segment_by_segment() {
        for (pattern, target, expected) in [
            ("*", "file", true),
            ("*", "dir/file", false),
            ("*.md", "README.md", true),
            ("*.md", "releases/README.md", false),
            ("*.md", "README.MD", false),
            ("foo-?.tgz", "foo-1.tgz", true),
            ("foo-?.tgz", "foo-alpha.tgz", false),
            ("releases/*/*", "releases/x/x_v1", true),
            ("releases/y/*.zip", "releases/z/z_v1.zip", false),
            ("[ab]*", "bee", true),
            ("[!ab]*", "bee", false),
            ("v[0-9].txt", "v7.txt", true),
            ("v[0-9].txt", "vx.txt", false),
            ("a[", "a[", true),
            ("", "", true),
        ] {
            assert_eq!(
                path_pattern_matches(pattern, target),
                expected,
                "{pattern} {target}"
            );
        }
    }

    /// The order a search visits roles in, over a graph of
    /// (delegator, role, terminating, covers the target).
    fn visits(graph: &[(&str, &str, bool, bool)]) -> Vec<String> {
        let mut search = DelegationSearch::new(MAX_DELEGATIONS);
        let mut order = Vec::new();
        while let Some(step) = search.next_step() {
            if step.role != "targets" {
                order.push(step.role.clone());
            }
            search.expand(
                &step.role,
                graph
                    .iter()
                    .filter(|(delegator, ..)| *delegator == step.role)
                    .map(|(_, role, terminating, covers)| (*role, *terminating, *covers)),
            );
        }
        order
    }

    #[test]
    fn the_search_is_pre_order_depth_first() {
        let t = "targets";
        assert_eq!(
            visits(&[
                (t, "A", false, true),
                (t, "B", false, true),
                ("A", "C", false, true),
                ("A", "D", false, true)
            ]),
            ["A", "C", "D", "B"]
        );
        // A terminating delegation ends the search outside its subtree.
        assert_eq!(
            visits(&[
                (t, "A", false, true),
                (t, "B", false, true),
                ("A", "C", true, true),
                ("A", "D", false, true)
            ]),
            ["A", "C"]
        );
        assert_eq!(
            visits(&[
                (t, "A", false, true),
                (t, "B", false, true),
                ("A", "C", true, true),
                ("C", "D", false, true)
            ]),
            ["A", "C", "D"]
        );
        // Branches that do not cover the path are not visited.
        assert_eq!(
            visits(&[
                (t, "A", false, false),
                (t, "B", false, true),
                ("A", "C", false, true)
            ]),
            ["B"]
        );
        // Cycles and diamonds: each role once.
        assert_eq!(
            visits(&[
                (t, "A", false, true),
                (t, "B", false, true),
                ("B", "C", false, true),
                ("C", "D", false, true),
                ("D", "B", false, true)
            ]),
            ["A", "B", "C", "D"]
        );
        assert_eq!(
            visits(&[
                (t, "A", false, true),
                (t, "B", false, true),
                ("B", "C", false, true),
                ("A", "C", false, true)
            ]),
            ["A", "C", "B"]
        );
    }

    #[test]
    fn the_search_stops_at_its_budget() {
        let mut search = DelegationSearch::new(2);
        let first = search.next_step().unwrap();
        search.expand(&first.role, [("A", false, true), ("B", false, true)]);
        assert_eq!(search.next_step().unwrap().role, "A");
        assert_eq!(search.next_step(), None);
    }

    #[test]
    fn timestamp_decisions() {
        use TimestampDecision::*;
        assert_eq!(timestamp_decision(None, (1, 1)), Ok(UseNew));
        assert_eq!(timestamp_decision(Some((2, 5)), (3, 5)), Ok(UseNew));
        assert_eq!(timestamp_decision(Some((2, 5)), (2, 100)), Ok(KeepTrusted));
        assert_eq!(
            timestamp_decision(Some((2, 5)), (1, 5)),
            Err(("timestamp", 2, 1))
        );
        assert_eq!(
            timestamp_decision(Some((2, 5)), (3, 4)),
            Err(("snapshot", 5, 4))
        );
    }

    fn meta(version: u64) -> MetaFile {
        MetaFile {
            version,
            length: None,
            hashes: None,
        }
    }

    #[test]
    fn snapshot_rollbacks() {
        let trusted = BTreeMap::from([
            ("targets.json".to_string(), meta(3)),
            ("a.json".to_string(), meta(1)),
        ]);
        let newer = BTreeMap::from([
            ("targets.json".to_string(), meta(3)),
            ("a.json".to_string(), meta(2)),
            ("b.json".to_string(), meta(1)),
        ]);
        assert_eq!(snapshot_rollback(&trusted, &newer), Ok(()));
        let older = BTreeMap::from([
            ("targets.json".to_string(), meta(2)),
            ("a.json".to_string(), meta(1)),
        ]);
        assert_eq!(
            snapshot_rollback(&trusted, &older),
            Err(SnapshotRollback {
                file: "targets.json".to_string(),
                trusted_version: 3,
                offered_version: Some(2)
            })
        );
        let removed = BTreeMap::from([("targets.json".to_string(), meta(3))]);
        assert_eq!(
            snapshot_rollback(&trusted, &removed),
            Err(SnapshotRollback {
                file: "a.json".to_string(),
                trusted_version: 1,
                offered_version: None
            })
        );
    }

    #[test]
    fn target_checks_length_as_bytes_arrive_and_hashes_at_the_end() {
        let data = b"target file contents";
        let hashes = BTreeMap::from([
            (
                "sha512".to_string(),
                hex::encode(sha2::Sha512::digest(data)),
            ),
            ("unknown".to_string(), "00".to_string()),
        ]);
        let mut check = TargetCheck::new("t", data.len() as u64, &hashes).unwrap();
        check.update(&data[..5]).unwrap();
        check.update(&data[5..]).unwrap();
        check.finish().unwrap();

        let mut check = TargetCheck::new("t", 4, &hashes).unwrap();
        let error = check.update(data).unwrap_err().to_string();
        assert!(error.contains("longer"), "{error}");

        let check = TargetCheck::new("t", data.len() as u64 + 1, &hashes).unwrap();
        let error = check.finish().unwrap_err().to_string();
        assert!(error.contains("length"), "{error}");

        let mut check = TargetCheck::new("t", data.len() as u64, &hashes).unwrap();
        check.update(b"TARGET FILE CONTENTS").unwrap();
        let error = check.finish().unwrap_err().to_string();
        assert!(error.contains("sha512"), "{error}");

        let unknown = BTreeMap::from([("unknown".to_string(), "00".to_string())]);
        assert!(TargetCheck::new("t", 1, &unknown).is_err());
        assert!(reader_matches(&data[..], data.len() as u64, &hashes).unwrap());
        assert!(!reader_matches(&b"other"[..], data.len() as u64, &hashes).unwrap());
    }

    #[test]
    fn naming_hash_prefers_sha256() {
        let both = BTreeMap::from([
            ("sha512".to_string(), "b".to_string()),
            ("sha256".to_string(), "a".to_string()),
        ]);
        assert_eq!(naming_hash(&both), Some("a"));
        let other = BTreeMap::from([
            ("md5".to_string(), "m".to_string()),
            ("sha512".to_string(), "b".to_string()),
        ]);
        assert_eq!(naming_hash(&other), Some("b"));
    }

    #[test]
    fn metadata_bytes_are_checked_against_their_listing() {
        let raw = b"{}";
        let mut listed = meta(1);
        check_meta_bytes("snapshot", raw, &listed).unwrap();
        listed.length = Some(3);
        assert!(check_meta_bytes("snapshot", raw, &listed).is_err());
        listed.length = Some(2);
        listed.hashes = Some(BTreeMap::from([(
            "sha256".to_string(),
            hex::encode(sha2::Sha256::digest(raw)),
        )]));
        check_meta_bytes("snapshot", raw, &listed).unwrap();
        listed.hashes = Some(BTreeMap::from([("sha256".to_string(), "00".to_string())]));
        assert!(check_meta_bytes("snapshot", raw, &listed).is_err());
    }
}
