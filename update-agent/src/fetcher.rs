//! The fetcher: the agent's only code that talks to the network or decodes
//! bytes nothing has verified yet (HTTP, TLS, zstd), in a process of its own
//! with no privilege (`racklet-update fetcher`; in the image the socket-
//! activated `racklet-update-fetch@.service`, a dynamic user with no access
//! to devices, the ESP, the state or the system bus).
//!
//! The privileged agent ([`Fetcher`]) asks for one URL per connection and
//! trusts nothing it gets back: metadata and small targets go through tough
//! (signatures, versions, lengths, hashes), and a root or hash-tree artifact,
//! which the fetcher decompresses, is checked by the agent as it writes it,
//! against the uncompressed length and sha256 of the signed manifest
//! ([`crate::install::write_artifact`]). See docs/update-flow.md, "Two
//! processes".
//!
//! The protocol, on a Unix socket or a child's stdin/stdout:
//! * request: one line of JSON ([`FetchRequest`]), at most
//!   [`MAX_REQUEST_BYTES`];
//! * answer: frames, each a kind byte, a big-endian `u32` length and that many
//!   bytes: [`FRAME_DATA`] (bytes), [`FRAME_RESUMED`] (a download went on with
//!   a range request; empty), then exactly one of [`FRAME_END`] (all bytes
//!   sent; empty) or [`FRAME_FAILED`] (a JSON [`FetchFailure`]). A connection
//!   that ends before either is a transport failure.
//!
//! For speed (issue 16): data frames are whole MiB but the last; the fetcher
//! hashes the published bytes on the task that receives them, in parallel with
//! zstd, which reads the received chunks where they are; the agent reads a data
//! frame's payload straight into its caller's buffer; a spawned fetcher answers
//! over a socket pair (more buffer than a pipe, like the socket-activated one).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;
use tough::{Bytes, Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

use crate::config::redacted;
use crate::download::{ReceivedStream, ResumeRules, ResumingTransport};

/// The socket `racklet-update-fetch.socket` listens on (root only: 0600).
pub const FETCHER_SOCKET_PATH: &str = "/run/racklet-update-fetch.sock";
/// The longest request line.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// The longest frame.
pub const MAX_FRAME_BYTES: u32 = 4 << 20;
/// Bytes of the answer's data frames (and of the decompressor's reads).
const DATA_FRAME_BYTES: usize = 1 << 20;
/// The longest chunk [`Fetcher`]'s tough transport passes on (its channel
/// holds [`crate::tuf::TARGET_CHANNEL_CHUNKS`] of them: memory stays small).
const TRANSPORT_CHUNK_BYTES: usize = 64 << 10;
/// A frame's kind byte and big-endian `u32` length.
const FRAME_HEADER_BYTES: usize = 5;

pub const FRAME_DATA: u8 = b'D';
pub const FRAME_RESUMED: u8 = b'R';
pub const FRAME_END: u8 = b'Z';
pub const FRAME_FAILED: u8 = b'E';

/// What the agent asks the fetcher for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// `http`, `https` or `file`.
    pub url: String,
    /// The longest wait for a byte ([`ResumeRules::with_timeout`]).
    pub timeout_seconds: u64,
    /// PEM certificates TLS trusts besides the system's store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_certificates_pem: Option<String>,
    /// The signed length and sha256 of the bytes as published: more bytes
    /// stop the download at once, a different sha256 fails it at the end.
    /// Only good error messages depend on this: the agent checks what it
    /// gets itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<SignedBytes>,
    /// Decompress (zstd) and send the uncompressed bytes, at most this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_uncompressed_length: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBytes {
    pub length: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Why a fetch failed, as the fetcher reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{message}")]
pub struct FetchFailure {
    pub kind: FailureKind,
    /// Names the URL (credentials removed) and what went wrong.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The server said there is no such file (403, 404, 410).
    NotFound,
    /// The network, the server or the fetcher itself: worth another try.
    Transport,
    /// The bytes are not the signed ones (too long, other hash, not zstd,
    /// longer than their uncompressed length): trying again will not help.
    Mismatch,
    /// The request itself was wrong.
    Request,
}

impl FetchFailure {
    fn new(kind: FailureKind, message: impl Into<String>) -> FetchFailure {
        FetchFailure {
            kind,
            message: message.into(),
        }
    }

    /// As an `io::Error` (`InvalidData` for a mismatch) that carries it.
    pub fn into_io(self) -> io::Error {
        let kind = match self.kind {
            FailureKind::Mismatch => io::ErrorKind::InvalidData,
            FailureKind::NotFound => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// The failure an `io::Error` from a [`FetchedReader`] carries.
    pub fn from_io(error: &io::Error) -> Option<&FetchFailure> {
        error.get_ref()?.downcast_ref::<FetchFailure>()
    }
}

// ---------------------------------------------------------------------------
// The fetcher's side (unprivileged).

/// Serve one request: read it from `input`, answer on `output`. Errors
/// writing the answer end the process's work (the agent went away).
pub async fn serve(input: impl Read + Send + 'static, output: impl Write + Send + 'static) {
    let request = tokio::task::spawn_blocking(move || read_request(input))
        .await
        .unwrap_or_else(|error| Err(FetchFailure::new(FailureKind::Request, error.to_string())));
    let mut output = FrameWriter::new(output);
    let request = match request {
        Ok(request) => request,
        Err(failure) => {
            let _ = output.failed(&failure);
            return;
        }
    };
    let url_text = redacted_text(&request.url);
    tracing::info!(url = %url_text, decompress = request.zstd_uncompressed_length.is_some(), "fetching");
    let resumed = Arc::new(AtomicU64::new(0));
    let (sender, receiver) = mpsc::channel(crate::tuf::TARGET_CHANNEL_CHUNKS);
    let shipped = Arc::new(Mutex::new(Sha256::new()));
    match start_download(&request, Arc::clone(&resumed)).await {
        Ok(stream) => {
            tokio::spawn(forward(stream, sender, Arc::clone(&shipped)));
        }
        Err(failure) => {
            let _ = output.failed(&failure);
            return;
        }
    }
    let answered = tokio::task::spawn_blocking(move || {
        let source = ChannelReader {
            receiver,
            chunk: Bytes::new(),
            failure: None,
        };
        answer(&request, source, shipped, &resumed, &mut output)
    })
    .await;
    match answered {
        Ok(Ok(())) => tracing::info!(url = %url_text, "sent"),
        Ok(Err(error)) => tracing::warn!(url = %url_text, %error, "the agent went away"),
        Err(error) => tracing::error!(url = %url_text, %error, "the answering task failed"),
    }
}

fn read_request(input: impl Read) -> Result<FetchRequest, FetchFailure> {
    let mut line = Vec::new();
    BufReader::new(input.take(MAX_REQUEST_BYTES + 1))
        .read_until(b'\n', &mut line)
        .map_err(|error| {
            FetchFailure::new(
                FailureKind::Request,
                format!("reading the request: {error}"),
            )
        })?;
    if line.len() as u64 > MAX_REQUEST_BYTES {
        return Err(FetchFailure::new(
            FailureKind::Request,
            format!("the request is longer than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    serde_json::from_slice(&line).map_err(|error| {
        FetchFailure::new(
            FailureKind::Request,
            format!("the request is not a fetch request: {error}"),
        )
    })
}

async fn start_download(
    request: &FetchRequest,
    resumed: Arc<AtomicU64>,
) -> Result<TransportStream, FetchFailure> {
    let url = Url::parse(&request.url).map_err(|error| {
        FetchFailure::new(
            FailureKind::Request,
            format!("{}: not a URL: {error}", redacted_text(&request.url)),
        )
    })?;
    let extra = match &request.extra_ca_certificates_pem {
        Some(pem) => crate::download::parse_ca_certificates(pem.as_bytes()).map_err(|problem| {
            FetchFailure::new(
                FailureKind::Request,
                format!("extra_ca_certificates: {problem}"),
            )
        })?,
        None => Vec::new(),
    };
    let transport = ResumingTransport::new(
        ResumeRules::with_timeout(Duration::from_secs(request.timeout_seconds.max(1))),
        resumed,
        extra,
    )
    .map_err(|error| FetchFailure::new(FailureKind::Transport, error.to_string()))?;
    transport.fetch(url).await.map_err(transport_failure)
}

fn transport_failure(error: TransportError) -> FetchFailure {
    let kind = if error.kind() == TransportErrorKind::FileNotFound {
        FailureKind::NotFound
    } else {
        FailureKind::Transport
    };
    FetchFailure::new(kind, crate::download::error_chain(&error))
}

/// The transport's stream into a channel the blocking side reads; the bytes
/// are hashed into `shipped` here, before they are sent, in parallel with the
/// decompression on the blocking side.
async fn forward(
    stream: TransportStream,
    sender: mpsc::Sender<Result<Bytes, FetchFailure>>,
    shipped: Arc<Mutex<Sha256>>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = crate::tuf::next_item(stream.as_mut()).await {
        let item = item.map_err(transport_failure);
        if let Ok(bytes) = &item {
            shipped
                .lock()
                .expect("nothing panics holding it")
                .update(bytes);
        }
        let last = item.is_err();
        if sender.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The channel as a blocking `BufRead` (the received chunks are its
/// buffer: the decompressor reads them where they are); a failure is kept
/// for the answer.
struct ChannelReader {
    receiver: mpsc::Receiver<Result<Bytes, FetchFailure>>,
    chunk: Bytes,
    failure: Option<FetchFailure>,
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunk.is_empty() {
            if let Some(failure) = &self.failure {
                return Err(failure.clone().into_io());
            }
            match self.receiver.blocking_recv() {
                Some(Ok(bytes)) => self.chunk = bytes,
                Some(Err(failure)) => self.failure = Some(failure),
                None => break,
            }
        }
        Ok(&self.chunk)
    }

    fn consume(&mut self, amount: usize) {
        let _ = self.chunk.split_to(amount);
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        copy_buffered(self, buffer)
    }
}

/// `Read::read` of a `BufRead`: from its buffer.
fn copy_buffered(source: &mut impl BufRead, buffer: &mut [u8]) -> io::Result<usize> {
    let available = source.fill_buf()?;
    let count = buffer.len().min(available.len());
    buffer[..count].copy_from_slice(&available[..count]);
    source.consume(count);
    Ok(count)
}

/// The sha256 of the published bytes, computed where they were received
/// ([`forward`]), in parallel with the decompression: every byte the source
/// gives was hashed there before, so once the source has ended it is the
/// sha256 of all of them.
type ShippedHash = Arc<Mutex<Sha256>>;

/// Counts the published bytes; stops past their signed length.
struct CheckedSource<R> {
    inner: R,
    count: u64,
    hasher: ShippedHash,
    limit: Option<u64>,
}

impl<R> CheckedSource<R> {
    /// Past its signed length (then every read fails, reading nothing more).
    fn over_long(&self) -> Option<FetchFailure> {
        let limit = self.limit.filter(|limit| self.count > *limit)?;
        Some(FetchFailure::new(
            FailureKind::Mismatch,
            format!("longer than its signed length of {limit} bytes"),
        ))
    }
}

impl<R: BufRead> BufRead for CheckedSource<R> {
    /// Never more than the signed length: bytes past it are counted (and
    /// dropped) and fail this and every later call.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some(failure) = self.over_long() {
            return Err(failure.into_io());
        }
        let available = self.inner.fill_buf()?.len();
        let allowed = match self.limit {
            Some(limit) => usize::try_from(limit - self.count).unwrap_or(usize::MAX),
            None => usize::MAX,
        };
        if allowed == 0 && available > 0 {
            self.inner.consume(available);
            self.count += available as u64;
            let failure = self.over_long().expect("counted past the limit");
            return Err(failure.into_io());
        }
        let buffer = self.inner.fill_buf()?;
        Ok(&buffer[..available.min(allowed)])
    }

    fn consume(&mut self, amount: usize) {
        self.inner.consume(amount);
        self.count += amount as u64;
    }
}

impl<R: BufRead> Read for CheckedSource<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        copy_buffered(self, buffer)
    }
}

/// Read the published bytes (decompressing them if asked) and send them.
fn answer<R: BufRead, W: Write>(
    request: &FetchRequest,
    source: R,
    hasher: ShippedHash,
    resumed: &AtomicU64,
    output: &mut FrameWriter<W>,
) -> io::Result<()> {
    let url = redacted_text(&request.url);
    let mut checked = CheckedSource {
        inner: source,
        count: 0,
        hasher,
        limit: request.signed.as_ref().map(|signed| signed.length),
    };
    let sent = match request.zstd_uncompressed_length {
        None => pump(&mut checked, None, resumed, output),
        Some(limit) => match zstd::stream::read::Decoder::with_buffer(&mut checked) {
            Ok(decoder) => pump(decoder, Some(limit), resumed, output),
            Err(error) => Err(Err(FetchFailure::new(
                FailureKind::Transport,
                format!("cannot start zstd: {error}"),
            ))),
        },
    };
    // Count and hash what the decompressor left unread (a trailer, or what
    // follows a frame that failed to decode).
    let drained = io::copy(&mut checked, &mut io::sink()).map_err(|error| {
        FetchFailure::from_io(&error)
            .cloned()
            .unwrap_or_else(|| FetchFailure::new(FailureKind::Transport, error.to_string()))
    });
    let failure = match (sent, drained) {
        (Err(Ok(error)), _) => return Err(error),
        // The network failed: worth another try, whatever was received.
        (Err(Err(failure)), _) if failure.kind == FailureKind::Transport => Some(failure),
        (_, Err(failure)) if failure.kind == FailureKind::Transport => Some(failure),
        // Bytes other than the signed ones explain a decoding error.
        (sent, drained) => checked
            .over_long()
            .or_else(|| check_signed(request, &checked).err())
            .or(drained.err())
            .or(sent.err().and_then(Result::err)),
    };
    match failure {
        None => output.end(),
        Some(mut failure) => {
            failure.message = format!("{url}: {}", failure.message);
            output.failed(&failure)
        }
    }
}

/// `Err(Ok(_))`: the output failed; `Err(Err(_))`: the source failed.
///
/// Each data frame is a whole [`DATA_FRAME_BYTES`] (but the last): the buffer
/// is filled first, so the agent wakes once per MiB, and its header goes into
/// the buffer's first [`FRAME_HEADER_BYTES`], so the bytes are written to the
/// output as they are, without another copy.
fn pump<R: Read, W: Write>(
    mut source: R,
    limit: Option<u64>,
    resumed: &AtomicU64,
    output: &mut FrameWriter<W>,
) -> Result<(), Result<io::Error, FetchFailure>> {
    let mut framed = vec![0u8; FRAME_HEADER_BYTES + DATA_FRAME_BYTES];
    let mut sent: u64 = 0;
    let mut resumes_told = 0;
    loop {
        let (count, failed) = fill(&mut source, &mut framed[FRAME_HEADER_BYTES..]);
        let resumes = resumed.load(Ordering::Relaxed);
        while resumes_told < resumes {
            output.frame(FRAME_RESUMED, &[]).map_err(Ok)?;
            resumes_told += 1;
        }
        if let Some(limit) = limit.filter(|limit| sent + count as u64 > *limit) {
            return Err(Err(FetchFailure::new(
                FailureKind::Mismatch,
                format!("decompresses to more than its signed {limit} bytes"),
            )));
        }
        if count > 0 {
            output
                .data_frame(&mut framed[..FRAME_HEADER_BYTES + count])
                .map_err(Ok)?;
            sent += count as u64;
        }
        if let Some(error) = failed {
            let failure = FetchFailure::from_io(&error).cloned().unwrap_or_else(|| {
                let kind = if limit.is_some() {
                    FailureKind::Mismatch
                } else {
                    FailureKind::Transport
                };
                let what = if limit.is_some() { "zstd: " } else { "" };
                FetchFailure::new(kind, format!("{what}after {sent} bytes: {error}"))
            });
            return Err(Err(failure));
        }
        if count < DATA_FRAME_BYTES {
            return Ok(());
        }
    }
}

/// Reads until `buffer` is full, the source ends or fails: the bytes read,
/// and the error that stopped it.
fn fill<R: Read>(source: &mut R, buffer: &mut [u8]) -> (usize, Option<io::Error>) {
    match crate::install::fill(source, buffer) {
        Ok(filled) => (filled, None),
        Err((error, filled)) => (filled, Some(error)),
    }
}

fn check_signed<R>(request: &FetchRequest, checked: &CheckedSource<R>) -> Result<(), FetchFailure> {
    let Some(signed) = &request.signed else {
        return Ok(());
    };
    if checked.count != signed.length {
        return Err(FetchFailure::new(
            FailureKind::Mismatch,
            format!(
                "{} bytes received, its signed length is {}",
                checked.count, signed.length
            ),
        ));
    }
    // Called once the source ended: every byte is in the hash.
    let sha256 = hex::encode(
        checked
            .hasher
            .lock()
            .expect("nothing panics holding it")
            .clone()
            .finalize(),
    );
    if sha256 != signed.sha256 {
        return Err(FetchFailure::new(
            FailureKind::Mismatch,
            format!(
                "sha256 mismatch: received {sha256}, signed {}",
                signed.sha256
            ),
        ));
    }
    Ok(())
}

struct FrameWriter<W: Write> {
    output: io::BufWriter<W>,
}

impl<W: Write> FrameWriter<W> {
    fn new(output: W) -> FrameWriter<W> {
        FrameWriter {
            output: io::BufWriter::new(output),
        }
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let length = u32::try_from(payload.len()).expect("frames are small");
        self.output.write_all(&[kind])?;
        self.output.write_all(&length.to_be_bytes())?;
        self.output.write_all(payload)?;
        if kind != FRAME_DATA {
            self.output.flush()?;
        }
        Ok(())
    }

    /// A data frame whose payload follows [`FRAME_HEADER_BYTES`] reserved
    /// for its header in `framed`: written straight to the output.
    fn data_frame(&mut self, framed: &mut [u8]) -> io::Result<()> {
        let length = u32::try_from(framed.len() - FRAME_HEADER_BYTES).expect("frames are small");
        framed[0] = FRAME_DATA;
        framed[1..FRAME_HEADER_BYTES].copy_from_slice(&length.to_be_bytes());
        self.output.flush()?;
        self.output.get_mut().write_all(framed)
    }

    fn end(&mut self) -> io::Result<()> {
        self.frame(FRAME_END, &[])
    }

    fn failed(&mut self, failure: &FetchFailure) -> io::Result<()> {
        tracing::warn!(kind = ?failure.kind, "{}", failure.message);
        let json = serde_json::to_vec(failure).expect("a failure serialises");
        self.frame(FRAME_FAILED, &json)
    }
}

fn redacted_text(url: &str) -> String {
    match Url::parse(url) {
        Ok(url) => redacted(&url),
        Err(_) => "(not a URL)".to_string(),
    }
}

// ---------------------------------------------------------------------------
// The agent's side (privileged).

/// How the agent reaches a fetcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetcherLaunch {
    /// Connect to this socket (the image: `racklet-update-fetch.socket`
    /// starts an unprivileged fetcher per connection).
    Socket(PathBuf),
    /// Start this program with the argument `fetcher` per request, with the
    /// agent's own privileges (tests, and a daemon started by hand).
    Spawn(PathBuf),
}

impl FetcherLaunch {
    /// `--fetcher-socket`, or else this program itself.
    pub fn from_socket_option(socket: Option<&Path>) -> FetcherLaunch {
        match socket {
            Some(socket) => FetcherLaunch::Socket(socket.to_path_buf()),
            None => FetcherLaunch::Spawn(
                std::env::current_exe().unwrap_or_else(|_| PathBuf::from("racklet-update")),
            ),
        }
    }
}

/// The agent's handle on the fetcher: a tough [`Transport`] for metadata and
/// targets tough checks, and [`Fetcher::decompressed_reader`] for artifacts
/// the agent checks as it writes them.
#[derive(Clone, Debug)]
pub struct Fetcher {
    launch: FetcherLaunch,
    timeout: Duration,
    extra_ca_certificates_pem: Option<String>,
    /// Counts the downloads that went on with a range request.
    resumed: Arc<AtomicU64>,
}

impl Fetcher {
    pub fn new(
        launch: FetcherLaunch,
        timeout: Duration,
        extra_ca_certificates_pem: Option<String>,
        resumed: Arc<AtomicU64>,
    ) -> Fetcher {
        Fetcher {
            launch,
            timeout,
            extra_ca_certificates_pem,
            resumed,
        }
    }

    fn request(&self, url: &Url) -> FetchRequest {
        FetchRequest {
            url: url.to_string(),
            timeout_seconds: self.timeout.as_secs().max(1),
            extra_ca_certificates_pem: self.extra_ca_certificates_pem.clone(),
            signed: None,
            zstd_uncompressed_length: None,
        }
    }

    /// Send `request` to a new fetcher (blocking).
    fn connect(&self, request: &FetchRequest) -> Result<FetchConnection, FetchFailure> {
        let mut line = serde_json::to_vec(request).expect("a request serialises");
        line.push(b'\n');
        let unreachable = |what: &str, error: io::Error| {
            FetchFailure::new(FailureKind::Transport, format!("{what}: {error}"))
        };
        match &self.launch {
            FetcherLaunch::Socket(path) => {
                let what = format!("the fetcher's socket {}", path.display());
                let mut stream = UnixStream::connect(path).map_err(|e| unreachable(&what, e))?;
                stream.write_all(&line).map_err(|e| unreachable(&what, e))?;
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(|e| unreachable(&what, e))?;
                Ok(FetchConnection {
                    input: Box::new(io::BufReader::new(stream)),
                    child: None,
                })
            }
            FetcherLaunch::Spawn(program) => {
                let what = format!("the fetcher {} fetcher", program.display());
                // Its answer comes over a socket pair, like from the socket-
                // activated fetcher: a socket buffers about 200 KiB where a
                // pipe buffers 64 KiB, so both sides wake up less often.
                let (answer, its_stdout) = UnixStream::pair().map_err(|e| unreachable(&what, e))?;
                let mut child = Command::new(program)
                    .arg("fetcher")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(its_stdout)))
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| unreachable(&what, e))?;
                let mut stdin = child.stdin.take().expect("piped stdin");
                let written = stdin.write_all(&line);
                drop(stdin);
                let connection = FetchConnection {
                    input: Box::new(io::BufReader::new(answer)),
                    child: Some(child),
                };
                written.map_err(|e| unreachable(&what, e))?;
                Ok(connection)
            }
        }
    }

    /// Fetch `url`, zstd-decompressed by the fetcher: a blocking reader of
    /// the uncompressed bytes. `signed` is what the published (compressed)
    /// bytes must be; the caller checks the uncompressed bytes against the
    /// signed manifest itself (nothing the fetcher says is trusted). Call
    /// outside async code: it blocks.
    pub fn decompressed_reader(
        &self,
        url: &Url,
        signed: SignedBytes,
        uncompressed_length: u64,
    ) -> FetchedReader {
        let mut request = self.request(url);
        request.signed = Some(signed);
        request.zstd_uncompressed_length = Some(uncompressed_length);
        FetchedReader::start(self.connect(&request), Arc::clone(&self.resumed))
    }
}

#[tough::async_trait]
impl Transport for Fetcher {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if !matches!(url.scheme(), "http" | "https" | "file") {
            return Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                redacted(&url),
            ));
        }
        let (sender, receiver) = mpsc::channel(crate::tuf::TARGET_CHANNEL_CHUNKS);
        let fetcher = self.clone();
        tokio::task::spawn_blocking(move || {
            let request = fetcher.request(&url);
            let mut reader =
                FetchedReader::start(fetcher.connect(&request), Arc::clone(&fetcher.resumed));
            loop {
                let item = match reader.next_chunk() {
                    Ok(Some(bytes)) => Ok(bytes),
                    Ok(None) => return,
                    Err(failure) => {
                        let kind = if failure.kind == FailureKind::NotFound {
                            TransportErrorKind::FileNotFound
                        } else {
                            TransportErrorKind::Other
                        };
                        Err(TransportError::new_with_cause(
                            kind,
                            redacted(&url),
                            failure,
                        ))
                    }
                };
                let last = item.is_err();
                if sender.blocking_send(item).is_err() || last {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceivedStream::new(receiver)))
    }
}

/// One connection to a fetcher.
struct FetchConnection {
    input: Box<dyn Read + Send>,
    /// A spawned fetcher: killed and reaped when the connection is dropped.
    child: Option<Child>,
}

impl Drop for FetchConnection {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A frame read from a fetcher.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Data(Vec<u8>),
    Resumed,
    End,
    Failed(FetchFailure),
}

/// Read one frame; a fetcher that stopped early or sent something else is a
/// transport failure.
#[cfg(test)]
fn read_frame(input: &mut dyn Read) -> Result<Frame, FetchFailure> {
    let (kind, length) = read_frame_header(input)?;
    let payload = read_payload(input, length)?;
    frame_of(kind, payload)
}

/// A frame's kind and payload length (checked against [`MAX_FRAME_BYTES`]).
fn read_frame_header(input: &mut dyn Read) -> Result<(u8, usize), FetchFailure> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    input.read_exact(&mut header).map_err(|error| {
        broken_answer(format!(
            "the fetcher stopped before the end of its answer ({error})"
        ))
    })?;
    let length = u32::from_be_bytes(header[1..].try_into().expect("4 bytes"));
    if length > MAX_FRAME_BYTES {
        return Err(broken_answer(format!(
            "the fetcher sent a frame of {length} bytes"
        )));
    }
    Ok((header[0], length as usize))
}

fn read_payload(input: &mut dyn Read, length: usize) -> Result<Vec<u8>, FetchFailure> {
    let mut payload = vec![0u8; length];
    input
        .read_exact(&mut payload)
        .map_err(stopped_inside_a_frame)?;
    Ok(payload)
}

fn frame_of(kind: u8, payload: Vec<u8>) -> Result<Frame, FetchFailure> {
    match kind {
        FRAME_DATA => Ok(Frame::Data(payload)),
        FRAME_RESUMED => Ok(Frame::Resumed),
        FRAME_END => Ok(Frame::End),
        FRAME_FAILED => serde_json::from_slice(&payload)
            .map(Frame::Failed)
            .map_err(|error| {
                broken_answer(format!("the fetcher's failure is not readable: {error}"))
            }),
        other => Err(broken_answer(format!(
            "the fetcher sent a frame of kind {other:#04x}"
        ))),
    }
}

fn broken_answer(message: String) -> FetchFailure {
    FetchFailure::new(FailureKind::Transport, message)
}

fn stopped_inside_a_frame(error: io::Error) -> FetchFailure {
    broken_answer(format!("the fetcher stopped inside a frame ({error})"))
}

/// What a fetcher answers, as a blocking `Read`. `read` returns `Ok(0)` only
/// after the fetcher said it sent everything; a failure is an `io::Error`
/// carrying the [`FetchFailure`] ([`FetchFailure::from_io`]), and every
/// later `read` fails too. **Nothing read is verified**: the reader's caller
/// checks it.
pub struct FetchedReader {
    connection: Result<FetchConnection, FetchFailure>,
    /// Bytes of the current data frame not read yet: [`Read::read`] reads
    /// them from the connection straight into its caller's buffer.
    frame_left: usize,
    done: bool,
    resumed: Arc<AtomicU64>,
}

impl FetchedReader {
    fn start(
        connection: Result<FetchConnection, FetchFailure>,
        resumed: Arc<AtomicU64>,
    ) -> FetchedReader {
        FetchedReader {
            connection,
            frame_left: 0,
            done: false,
            resumed,
        }
    }

    /// Reads frames up to the next data frame with bytes left (`frame_left`
    /// > 0); `false` at a clean end. A failure stays: later calls return it.
    fn next_data_frame(&mut self) -> Result<bool, FetchFailure> {
        while self.frame_left == 0 {
            if self.done {
                return Ok(false);
            }
            let connection = self
                .connection
                .as_mut()
                .map_err(|failure| failure.clone())?;
            let frame = read_frame_header(&mut connection.input).and_then(|(kind, length)| {
                if kind == FRAME_DATA {
                    // Its payload is read by the caller, into its own buffer.
                    return Ok(Err(length));
                }
                let payload = read_payload(&mut connection.input, length)?;
                frame_of(kind, payload).map(Ok)
            });
            match frame {
                Ok(Err(length)) => self.frame_left = length,
                Ok(Ok(Frame::Resumed)) => {
                    self.resumed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Frame::End)) => self.done = true,
                Ok(Ok(Frame::Data(_))) => unreachable!("data frames are not read here"),
                Ok(Ok(Frame::Failed(failure))) | Err(failure) => return Err(self.fail(failure)),
            }
        }
        Ok(true)
    }

    /// Keeps `failure` for every later call.
    fn fail(&mut self, failure: FetchFailure) -> FetchFailure {
        self.frame_left = 0;
        self.connection = Err(failure.clone());
        failure
    }

    /// The next bytes (of a data frame, at most [`TRANSPORT_CHUNK_BYTES`]),
    /// `None` at a clean end.
    fn next_chunk(&mut self) -> Result<Option<Bytes>, FetchFailure> {
        if !self.next_data_frame()? {
            return Ok(None);
        }
        let length = self.frame_left.min(TRANSPORT_CHUNK_BYTES);
        self.frame_left -= length;
        let connection = self.connection.as_mut().expect("a data frame came from it");
        match read_payload(&mut connection.input, length) {
            Ok(payload) => Ok(Some(Bytes::from(payload))),
            Err(failure) => Err(self.fail(failure)),
        }
    }
}

impl Read for FetchedReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        match self.next_data_frame() {
            Ok(true) => {}
            Ok(false) => return Ok(0),
            Err(failure) => return Err(failure.into_io()),
        }
        let want = buffer.len().min(self.frame_left);
        let connection = self.connection.as_mut().expect("a data frame came from it");
        let got = loop {
            match connection.input.read(&mut buffer[..want]) {
                Ok(0) => {
                    let early = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(self.fail(stopped_inside_a_frame(early)).into_io());
                }
                Ok(got) => break got,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.fail(stopped_inside_a_frame(error)).into_io()),
            }
        };
        self.frame_left -= got;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_to(request: &FetchRequest, published: &[u8]) -> Vec<u8> {
        let resumed = AtomicU64::new(0);
        // Hashed as if received, like `forward` does.
        let mut hasher = Sha256::new();
        hasher.update(published);
        let received = Arc::new(Mutex::new(hasher));
        let mut output = FrameWriter::new(Vec::new());
        answer(request, published, received, &resumed, &mut output).unwrap();
        output.output.into_inner().unwrap()
    }

    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            frames.push(read_frame(&mut bytes).unwrap());
        }
        frames
    }

    fn request(signed: Option<&[u8]>, uncompressed: Option<u64>) -> FetchRequest {
        FetchRequest {
            url: "https://user:secret@repo.example/targets/root.zst".into(),
            timeout_seconds: 10,
            extra_ca_certificates_pem: None,
            signed: signed.map(|bytes| SignedBytes {
                length: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(bytes)),
            }),
            zstd_uncompressed_length: uncompressed,
        }
    }

    fn data(frames: &[Frame]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::Data(bytes) => Some(bytes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn failure(frames: &[Frame]) -> &FetchFailure {
        match frames.last() {
            Some(Frame::Failed(failure)) => failure,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn plain_bytes_are_sent_in_frames_and_end() {
        let published: Vec<u8> = (0..3 * DATA_FRAME_BYTES + 7).map(|i| i as u8).collect();
        let answered = frames(&answer_to(&request(Some(&published), None), &published));
        assert_eq!(answered.last(), Some(&Frame::End));
        assert_eq!(data(&answered), published);
        // Whole frames but the last, read straight from the source.
        let lengths: Vec<usize> = answered
            .iter()
            .filter_map(|frame| match frame {
                Frame::Data(bytes) => Some(bytes.len()),
                _ => None,
            })
            .collect();
        assert_eq!(
            lengths,
            [DATA_FRAME_BYTES, DATA_FRAME_BYTES, DATA_FRAME_BYTES, 7]
        );
    }

    /// A reader over `answered` that returns at most `step` bytes per read.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            let count = buffer.len().min(self.step).min(self.bytes.len() - self.at);
            buffer[..count].copy_from_slice(&self.bytes[self.at..self.at + count]);
            self.at += count;
            Ok(count)
        }
    }

    fn reader_of(bytes: Vec<u8>, step: usize, resumed: &Arc<AtomicU64>) -> FetchedReader {
        let connection = FetchConnection {
            input: Box::new(Trickle { bytes, at: 0, step }),
            child: None,
        };
        FetchedReader::start(Ok(connection), Arc::clone(resumed))
    }

    #[test]
    fn the_reader_reads_data_frames_into_its_callers_buffers() {
        let mut output = FrameWriter::new(Vec::new());
        output.frame(FRAME_DATA, b"first ").unwrap();
        output.frame(FRAME_RESUMED, &[]).unwrap();
        output.frame(FRAME_DATA, b"").unwrap();
        let mut framed = vec![0u8; FRAME_HEADER_BYTES];
        framed.extend_from_slice(b"second frame");
        output.data_frame(&mut framed).unwrap();
        output.end().unwrap();
        let answered = output.output.into_inner().unwrap();
        for (step, read_size) in [(1, 1), (3, 4), (1000, 5), (1000, 100)] {
            let resumed = Arc::new(AtomicU64::new(0));
            let mut reader = reader_of(answered.clone(), step, &resumed);
            let mut got = Vec::new();
            let mut buffer = vec![0u8; read_size];
            loop {
                let count = reader.read(&mut buffer).unwrap();
                if count == 0 {
                    break;
                }
                got.extend_from_slice(&buffer[..count]);
            }
            assert_eq!(
                got, b"first second frame",
                "step {step}, reads of {read_size}"
            );
            assert_eq!(resumed.load(Ordering::Relaxed), 1);
            assert_eq!(reader.read(&mut buffer).unwrap(), 0, "the end stays");
        }

        // Cut inside the second data frame: a transport failure, and it stays.
        let cut = answered[..answered.len() - FRAME_HEADER_BYTES - 4].to_vec();
        let resumed = Arc::new(AtomicU64::new(0));
        let mut reader = reader_of(cut, 7, &resumed);
        let mut got = Vec::new();
        let error = reader.read_to_end(&mut got).unwrap_err();
        let failure = FetchFailure::from_io(&error).expect("a fetch failure");
        assert_eq!(failure.kind, FailureKind::Transport);
        assert!(failure.message.contains("inside a frame"), "{failure}");
        assert_eq!(got, b"first second f");
        assert!(reader.read(&mut [0; 4]).is_err(), "later reads fail too");

        // The tough transport's chunks: frames, cut to TRANSPORT_CHUNK_BYTES.
        let resumed = Arc::new(AtomicU64::new(0));
        let mut reader = reader_of(answered, 2, &resumed);
        assert_eq!(reader.next_chunk().unwrap().unwrap(), &b"first "[..]);
        assert_eq!(reader.next_chunk().unwrap().unwrap(), &b"second frame"[..]);
        assert_eq!(reader.next_chunk().unwrap(), None);
        let published = vec![7u8; 2 * TRANSPORT_CHUNK_BYTES + 1];
        let answered = answer_to(&request(Some(&published), None), &published);
        let mut reader = reader_of(answered, usize::MAX, &resumed);
        let mut lengths = Vec::new();
        while let Some(chunk) = reader.next_chunk().unwrap() {
            lengths.push(chunk.len());
        }
        assert_eq!(lengths, [TRANSPORT_CHUNK_BYTES, TRANSPORT_CHUNK_BYTES, 1]);
    }

    #[test]
    fn zstd_is_decompressed_within_the_signed_lengths() {
        let uncompressed: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        let compressed = zstd::encode_all(&uncompressed[..], 3).unwrap();
        let answered = frames(&answer_to(
            &request(Some(&compressed), Some(uncompressed.len() as u64)),
            &compressed,
        ));
        assert_eq!(answered.last(), Some(&Frame::End));
        assert_eq!(data(&answered), uncompressed);

        // More uncompressed bytes than signed: a mismatch, not all of it sent.
        let answered = frames(&answer_to(
            &request(Some(&compressed), Some(1_000_000)),
            &compressed,
        ));
        let refused = failure(&answered);
        assert_eq!(refused.kind, FailureKind::Mismatch);
        assert!(
            refused
                .message
                .contains("more than its signed 1000000 bytes"),
            "{refused}"
        );
        assert!(data(&answered).len() <= 1_000_000 + DATA_FRAME_BYTES);
    }

    #[test]
    fn bytes_that_are_not_the_signed_ones_are_a_mismatch_naming_the_url() {
        let published = b"the published bytes".to_vec();
        // Longer than signed.
        let mut longer = published.clone();
        longer.extend_from_slice(&[0; 100]);
        let refused = frames(&answer_to(&request(Some(&published), None), &longer));
        let refused = failure(&refused);
        assert_eq!(refused.kind, FailureKind::Mismatch);
        assert!(
            refused
                .message
                .contains("longer than its signed length of 19 bytes"),
            "{refused}"
        );
        assert!(
            refused.message.contains("repo.example/targets/root.zst: "),
            "{refused}"
        );
        assert!(!refused.message.contains("secret"), "{refused}");
        // Same length, other bytes.
        let mut other = published.clone();
        other[3] ^= 1;
        let refused = frames(&answer_to(&request(Some(&published), None), &other));
        assert!(
            failure(&refused).message.contains("sha256 mismatch"),
            "{:?}",
            refused
        );
        // Not zstd at all: the signed hash explains it.
        let refused = frames(&answer_to(&request(Some(&published), Some(100)), &other));
        let refused = failure(&refused);
        assert_eq!(refused.kind, FailureKind::Mismatch);
        assert!(refused.message.contains("sha256 mismatch"), "{refused}");
    }

    #[test]
    fn the_reader_sees_failures_and_an_early_end_as_errors() {
        let published = b"abc".to_vec();
        let answered = answer_to(&request(Some(&published), None), &published);
        let connection = FetchConnection {
            input: Box::new(io::Cursor::new(answered.clone())),
            child: None,
        };
        let resumed = Arc::new(AtomicU64::new(0));
        let mut reader = FetchedReader::start(Ok(connection), Arc::clone(&resumed));
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, published);

        // The same answer cut before its end frame.
        let cut = answered[..answered.len() - 5].to_vec();
        let connection = FetchConnection {
            input: Box::new(io::Cursor::new(cut)),
            child: None,
        };
        let mut reader = FetchedReader::start(Ok(connection), resumed);
        let mut got = Vec::new();
        let error = reader.read_to_end(&mut got).unwrap_err();
        let failure = FetchFailure::from_io(&error).expect("a fetch failure");
        assert_eq!(failure.kind, FailureKind::Transport);
        assert!(
            failure.message.contains("stopped before the end"),
            "{failure}"
        );
        assert!(reader.read(&mut [0; 4]).is_err(), "later reads fail too");
    }

    #[test]
    fn the_decompressor_never_sees_bytes_past_the_signed_length() {
        let uncompressed: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
        let compressed = zstd::encode_all(&uncompressed[..], 3).unwrap();
        // A second, valid frame after the signed bytes.
        let mut longer = compressed.clone();
        longer.extend_from_slice(&compressed);
        let answered = frames(&answer_to(
            &request(Some(&compressed), Some(2 * uncompressed.len() as u64)),
            &longer,
        ));
        let refused = failure(&answered);
        assert_eq!(refused.kind, FailureKind::Mismatch);
        assert!(
            refused.message.contains("longer than its signed length"),
            "{refused}"
        );
        assert!(data(&answered).len() <= uncompressed.len());
    }

    #[test]
    fn the_channel_reader_hands_out_its_chunks_and_keeps_a_failure() {
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        sender.try_send(Ok(Bytes::from_static(b""))).unwrap();
        sender.try_send(Ok(Bytes::from_static(b"defg"))).unwrap();
        let failed = FetchFailure::new(FailureKind::Transport, "reset");
        sender.try_send(Err(failed.clone())).unwrap();
        drop(sender);
        let mut reader = ChannelReader {
            receiver,
            chunk: Bytes::new(),
            failure: None,
        };
        let mut buffer = [0u8; 2];
        let mut got = Vec::new();
        let error = loop {
            match reader.read(&mut buffer) {
                Ok(count) => got.extend_from_slice(&buffer[..count]),
                Err(error) => break error,
            }
        };
        assert_eq!(got, b"abcdefg");
        assert_eq!(FetchFailure::from_io(&error), Some(&failed));
        assert!(reader.fill_buf().is_err(), "the failure stays");
    }

    #[test]
    fn requests_are_one_bounded_line() {
        let request = request(None, Some(5));
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        assert_eq!(read_request(&line[..]).unwrap(), request);
        let refused = read_request(&b"{\"url\": 1}\n"[..]).unwrap_err();
        assert_eq!(refused.kind, FailureKind::Request);
        let long = vec![b' '; MAX_REQUEST_BYTES as usize + 10];
        assert!(read_request(&long[..])
            .unwrap_err()
            .message
            .contains("longer than"));
    }
}
