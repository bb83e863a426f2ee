//! The agent's transport for tough: HTTP(S) downloads that go on where they
//! broke off, and `file://` through tough's own filesystem transport.
//!
//! A response body that stops (a dropped connection, a server that falls
//! silent for longer than the read timeout, a server error) is asked for
//! again from the first byte not yet received (`Range: bytes=N-`). Only
//! [`ResumeRules::attempts_without_progress`] attempts in a row that bring no
//! new byte end a download: one that makes progress is never abandoned for
//! taking long, and there is no timeout on a whole download, only on the
//! connection and between two reads. tough still checks the length and the
//! hashes of everything it reads through this transport, so nothing here is
//! trusted: a server that answers a range with other bytes makes the target
//! fail its hash, as any other corruption would.
//!
//! 403, 404 and 410 are "file not found" (tough relies on it to find the end
//! of a root rotation chain); other 4xx answers are final.
//!
//! TLS (rustls, aws-lc-rs) trusts the system's trust store, read through
//! rustls-platform-verifier (on Linux rustls-native-certs: `SSL_CERT_FILE`,
//! else `/etc/ssl/certs/ca-certificates.crt`, the image's bundle plus a
//! card's `[trust]` certificates), and the certificates of the agent's
//! `extra_ca_certificates` file ([`load_ca_certificates`]). A certificate the
//! server presents that does not verify is final: no attempt is repeated.
//! URLs in messages and logs carry no user or password
//! ([`crate::config::redacted`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use tokio::sync::mpsc;
use tough::{
    Bytes, FilesystemTransport, Transport, TransportError, TransportErrorKind, TransportStream,
};
use url::Url;

use crate::config::redacted;
use crate::tuf::Stream;

/// Why the transport could not be set up.
#[derive(Debug, Error)]
pub enum TransportSetupError {
    #[error("{}: cannot read the CA certificates that extra_ca_certificates names: {source}", .path.display())]
    ReadCaCertificates {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem} (extra_ca_certificates: expected PEM certificates, each from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----)", .path.display())]
    InvalidCaCertificates { path: PathBuf, problem: String },
    #[error("cannot set up the HTTP client: {source}")]
    Client {
        #[source]
        source: reqwest::Error,
    },
}

/// The CA certificates of a PEM file (`extra_ca_certificates`): every
/// `CERTIFICATE` block in it (other blocks are skipped), each one a
/// certificate rustls accepts as a trust anchor; at least one.
pub fn load_ca_certificates(
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportSetupError> {
    read_ca_certificates(path).map(|(_, certificates)| certificates)
}

/// The text of a PEM file of CA certificates, checked as
/// [`load_ca_certificates`] checks it (the file is read once): what the agent
/// hands the fetcher, which cannot read the file itself.
pub fn load_ca_certificates_pem(path: &Path) -> Result<String, TransportSetupError> {
    let (bytes, _) = read_ca_certificates(path)?;
    String::from_utf8(bytes).map_err(|_| TransportSetupError::InvalidCaCertificates {
        path: path.to_path_buf(),
        problem: "not text".to_string(),
    })
}

/// The file's bytes and the certificates in them.
fn read_ca_certificates(
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TransportSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TransportSetupError::ReadCaCertificates {
        path: path.to_path_buf(),
        source,
    })?;
    let certificates = parse_ca_certificates(&bytes).map_err(|problem| {
        TransportSetupError::InvalidCaCertificates {
            path: path.to_path_buf(),
            problem,
        }
    })?;
    Ok((bytes, certificates))
}

/// [`load_ca_certificates`] on the file's bytes. Pure.
pub(crate) fn parse_ca_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certificates = Vec::new();
    for (index, certificate) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let certificate =
            certificate.map_err(|error| format!("certificate {}: not PEM ({error})", index + 1))?;
        rustls::RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|error| {
                format!(
                    "certificate {}: not a certificate usable as a CA ({error})",
                    index + 1
                )
            })?;
        certificates.push(certificate);
    }
    if certificates.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certificates)
}

/// When a download gives up, and how long it waits between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeRules {
    /// At most this long to connect.
    pub connect_timeout: Duration,
    /// At most this long without a byte (while waiting for a response or
    /// between two reads of its body).
    pub read_timeout: Duration,
    /// Attempts in a row that bring no new byte before the download fails.
    pub attempts_without_progress: u32,
    /// The wait before the first retry; it doubles up to `max_backoff` and
    /// starts again after an attempt that made progress.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl ResumeRules {
    /// The agent's rules: `timeout` between bytes, 30 s at most to connect.
    pub fn with_timeout(timeout: Duration) -> ResumeRules {
        ResumeRules {
            connect_timeout: timeout.min(Duration::from_secs(30)),
            read_timeout: timeout,
            attempts_without_progress: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The wait before retry number `attempt` (1-based) of a run of attempts
    /// without progress.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// tough's [`Transport`] with resuming HTTP(S) downloads.
#[derive(Clone, Debug)]
pub struct ResumingTransport {
    client: reqwest::Client,
    rules: ResumeRules,
    /// How many times a download went on with a range request (all
    /// downloads of this transport; the agent shows it in its status).
    resumed: Arc<AtomicU64>,
}

impl ResumingTransport {
    /// A transport whose TLS trusts the system's trust store and
    /// `extra_ca_certificates` (from [`load_ca_certificates`]).
    pub fn new(
        rules: ResumeRules,
        resumed: Arc<AtomicU64>,
        extra_ca_certificates: Vec<CertificateDer<'static>>,
    ) -> Result<ResumingTransport, TransportSetupError> {
        // tough's builder installs its rustls crypto provider (aws-lc-rs) for
        // the process, which reqwest's client needs: the same TLS as tough's
        // own transport.
        let _ = tough::HttpTransportBuilder::new();
        let setup_error = |source| TransportSetupError::Client { source };
        let extra_roots = extra_ca_certificates
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(setup_error)?;
        let client = reqwest::Client::builder()
            .connect_timeout(rules.connect_timeout)
            .read_timeout(rules.read_timeout)
            .tls_certs_merge(extra_roots)
            .build()
            .map_err(setup_error)?;
        Ok(ResumingTransport {
            client,
            rules,
            resumed,
        })
    }
}

/// What one attempt at a response said.
enum Attempt {
    /// A body to read; `skip` bytes of it were received before (the server
    /// ignored the range and sent everything).
    Body {
        response: reqwest::Response,
        skip: u64,
    },
    NotFound(String),
    /// Worth another attempt (connection, timeout, 5xx, a range answered
    /// from the wrong place).
    Retry(String),
    Final(String),
}

/// Is this status worth another attempt?
fn classify_status(status: u16) -> Option<bool> {
    match status {
        200..=299 => None,
        403 | 404 | 410 => Some(false),
        408 | 429 | 500..=599 => Some(true),
        _ => Some(false),
    }
}

/// Where a `Content-Range: bytes START-END/LENGTH` answer starts.
fn content_range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes ")?
        .split_once('-')?
        .0
        .trim()
        .parse()
        .ok()
}

impl ResumingTransport {
    async fn attempt(&self, url: &Url, offset: u64) -> Attempt {
        let mut request = self.client.get(url.clone());
        if offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => match untrusted_certificate(&error) {
                // Asking again gets the same certificate.
                Some(problem) => {
                    return Attempt::Final(format!(
                        "TLS: the server's certificate does not verify ({problem}); is its CA in \
                         the system's trust store (a card's [trust]) or in extra_ca_certificates \
                         (a card's [update] ca_certificates)?"
                    ))
                }
                None => return Attempt::Retry(error_chain(&error)),
            },
        };
        let status = response.status().as_u16();
        match classify_status(status) {
            Some(true) => return Attempt::Retry(format!("HTTP {status}")),
            Some(false) if matches!(status, 403 | 404 | 410) => {
                return Attempt::NotFound(format!("HTTP {status}"))
            }
            Some(false) => return Attempt::Final(format!("HTTP {status}")),
            None => {}
        }
        if offset == 0 || status == 200 {
            // No range asked, or the server ignored it: skip what we have.
            return Attempt::Body {
                response,
                skip: offset,
            };
        }
        let start = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|value| value.to_str().ok())
            .and_then(content_range_start);
        if start == Some(offset) {
            Attempt::Body { response, skip: 0 }
        } else {
            Attempt::Retry(format!(
                "asked for bytes from {offset}, the server answered {status} from {start:?}"
            ))
        }
    }

    /// Download `url` into `sender`, resuming until it ends or fails.
    async fn download(&self, url: Url, sender: mpsc::Sender<Result<Bytes, TransportError>>) {
        let mut received: u64 = 0;
        let mut attempts_without_progress: u32 = 0;
        loop {
            let failure = match self.attempt(&url, received).await {
                Attempt::Body { response, skip } => {
                    let before = received;
                    match self.forward(response, skip, &mut received, &sender).await {
                        Forwarded::Finished | Forwarded::ReaderGone => return,
                        Forwarded::Broken(message) => {
                            if received > before {
                                attempts_without_progress = 0;
                            }
                            message
                        }
                    }
                }
                Attempt::NotFound(message) => {
                    let _ = sender
                        .send(Err(TransportError::new_with_cause(
                            TransportErrorKind::FileNotFound,
                            redacted(&url),
                            message,
                        )))
                        .await;
                    return;
                }
                Attempt::Final(message) => {
                    let _ = sender.send(Err(other_error(&url, message))).await;
                    return;
                }
                Attempt::Retry(message) => message,
            };
            attempts_without_progress += 1;
            if attempts_without_progress >= self.rules.attempts_without_progress {
                let message = format!(
                    "{failure} ({attempts_without_progress} attempts in a row without a new byte, {received} bytes received)"
                );
                let _ = sender.send(Err(other_error(&url, message))).await;
                return;
            }
            let wait = self.rules.backoff(attempts_without_progress);
            tracing::warn!(url = %redacted(&url), received, attempt = attempts_without_progress, error = %failure, "download broke off; going on from byte {received} in {wait:?}");
            tokio::time::sleep(wait).await;
            if received > 0 {
                self.resumed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forward a response body, dropping its first `skip` bytes.
    async fn forward(
        &self,
        response: reqwest::Response,
        mut skip: u64,
        received: &mut u64,
        sender: &mpsc::Sender<Result<Bytes, TransportError>>,
    ) -> Forwarded {
        let mut body = std::pin::pin!(response.bytes_stream());
        loop {
            match crate::tuf::next_item(body.as_mut()).await {
                None => return Forwarded::Finished,
                Some(Err(error)) => return Forwarded::Broken(error_chain(&error)),
                Some(Ok(mut bytes)) => {
                    if skip > 0 {
                        let dropped = skip.min(bytes.len() as u64);
                        let _ = bytes.split_to(dropped as usize);
                        skip -= dropped;
                    }
                    if bytes.is_empty() {
                        continue;
                    }
                    *received += bytes.len() as u64;
                    if sender.send(Ok(bytes)).await.is_err() {
                        return Forwarded::ReaderGone;
                    }
                }
            }
        }
    }
}

enum Forwarded {
    Finished,
    /// tough stopped reading (a length or hash check failed, or it was done).
    ReaderGone,
    Broken(String),
}

fn other_error(url: &Url, message: String) -> TransportError {
    TransportError::new_with_cause(TransportErrorKind::Other, redacted(url), message)
}

/// The certificate problem rustls found, when that is why `error` happened
/// (it sits in an `io::Error`, perhaps inside another, in the chain of
/// causes; `io::Error::source` skips the error it wraps, so that is
/// followed through `get_ref`).
fn untrusted_certificate(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(rustls::Error::InvalidCertificate(problem)) =
            current.downcast_ref::<rustls::Error>()
        {
            return Some(format!("{problem:?}"));
        }
        cause = match current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// An error and its causes, on one line (reqwest's own text leaves out why).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The receiving end of a download, as tough's stream.
pub(crate) struct ReceivedStream(mpsc::Receiver<Result<Bytes, TransportError>>);

impl ReceivedStream {
    pub(crate) fn new(receiver: mpsc::Receiver<Result<Bytes, TransportError>>) -> ReceivedStream {
        ReceivedStream(receiver)
    }
}

impl Stream for ReceivedStream {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(context)
    }
}

#[tough::async_trait]
impl Transport for ResumingTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => FilesystemTransport.fetch(url).await,
            "http" | "https" => {
                let (sender, receiver) = mpsc::channel(crate::tuf::TARGET_CHANNEL_CHUNKS);
                let transport = self.clone();
                tokio::spawn(async move { transport.download(url, sender).await });
                Ok(Box::pin(ReceivedStream(receiver)))
            }
            _ => Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                redacted(&url),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_limit() {
        let rules = ResumeRules::with_timeout(Duration::from_secs(60));
        let waits: Vec<Duration> = (1..=9).map(|attempt| rules.backoff(attempt)).collect();
        assert_eq!(waits[0], Duration::from_millis(250));
        assert_eq!(waits[1], Duration::from_millis(500));
        assert_eq!(waits[4], Duration::from_secs(4));
        assert_eq!(waits[8], Duration::from_secs(30));
        assert_eq!(rules.backoff(u32::MAX), Duration::from_secs(30));
        assert_eq!(rules.connect_timeout, Duration::from_secs(30));
        assert_eq!(
            ResumeRules::with_timeout(Duration::from_secs(5)).connect_timeout,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn statuses_are_final_not_found_or_worth_another_attempt() {
        for (status, expected) in [
            (200, None),
            (206, None),
            (404, Some(false)),
            (403, Some(false)),
            (410, Some(false)),
            (400, Some(false)),
            (416, Some(false)),
            (408, Some(true)),
            (429, Some(true)),
            (500, Some(true)),
            (503, Some(true)),
        ] {
            assert_eq!(classify_status(status), expected, "{status}");
        }
    }

    /// A throwaway CA (certificate and key, PEM) made with `openssl` now.
    fn throwaway_ca(directory: &Path) -> (String, String) {
        let output = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=racklet-agent-unit-test-ca", "-keyout"])
            .arg(directory.join("ca.key"))
            .arg("-out")
            .arg(directory.join("ca.pem"))
            .output()
            .expect("openssl runs (the tests make a throwaway CA with it)");
        assert!(output.status.success(), "openssl req: {output:?}");
        (
            std::fs::read_to_string(directory.join("ca.pem")).unwrap(),
            std::fs::read_to_string(directory.join("ca.key")).unwrap(),
        )
    }

    #[test]
    fn extra_ca_certificates_are_pem_certificates_and_errors_name_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let (ca, key) = throwaway_ca(directory.path());
        let other = directory.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let (second, _) = throwaway_ca(&other);
        // Other blocks (a key) are skipped; every certificate counts.
        let bundle = format!("# comment\n{ca}{key}{second}");
        assert_eq!(parse_ca_certificates(bundle.as_bytes()).unwrap().len(), 2);
        let path = directory.path().join("update-ca.pem");
        std::fs::write(&path, &ca).unwrap();
        assert_eq!(load_ca_certificates(&path).unwrap().len(), 1);
        // A transport trusting them can be built.
        ResumingTransport::new(
            ResumeRules::with_timeout(Duration::from_secs(5)),
            Arc::default(),
            load_ca_certificates(&path).unwrap(),
        )
        .unwrap();
        let cut: String = {
            let mut lines: Vec<&str> = ca.lines().collect();
            lines.remove(2);
            lines.join("\n")
        };
        for (contents, expected) in [
            (String::new(), "no certificate in it"),
            (key.clone(), "no certificate in it"),
            (cut, "certificate 1: "),
            (
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
                "certificate 1: not PEM",
            ),
        ] {
            std::fs::write(&path, &contents).unwrap();
            let error = load_ca_certificates(&path).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("{}: ", path.display()))
                    && error.contains(expected)
                    && error.contains("extra_ca_certificates"),
                "{contents:?}: {error}"
            );
        }
        let missing = directory.path().join("missing.pem");
        let error = load_ca_certificates(&missing).unwrap_err();
        assert!(
            matches!(&error, TransportSetupError::ReadCaCertificates { path, .. } if *path == missing),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_the_server_presents_that_does_not_verify_is_told_apart() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let tls = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )
        };
        assert_eq!(
            untrusted_certificate(&Wrapper(tls())).as_deref(),
            Some("UnknownIssuer")
        );
        // One io::Error inside another (hyper's connector around rustls's).
        let nested = std::io::Error::other(tls());
        assert_eq!(
            untrusted_certificate(&Wrapper(nested)).as_deref(),
            Some("UnknownIssuer")
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(untrusted_certificate(&Wrapper(refused)), None);
    }

    #[test]
    fn a_range_answer_says_where_it_starts() {
        assert_eq!(content_range_start("bytes 1024-2047/2048"), Some(1024));
        assert_eq!(content_range_start("bytes 0-9/*"), Some(0));
        assert_eq!(content_range_start("bytes */2048"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }
}
