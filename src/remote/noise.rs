//! The Noise channel of one relay stream: the hybrid IK handshake as the
//! `clatter` crate builds it (so that the bytes match the reference's), the
//! public-key JSON of the registry, the prologue that binds a handshake to
//! one registration and stream, and the record layer: length-prefixed
//! JSON-RPC messages cut into 60 KiB records, each one AEAD-sealed with an
//! implicit nonce, released in `seq` order through a bounded reorder
//! window.

use std::collections::BTreeMap;

use base64::Engine as _;
use clatter::bytearray::{ByteArray, HeapArray, SensitiveByteArray};
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::crypto::kem::rust_crypto_ml_kem::MlKem768;
use clatter::traits::{Dh, Handshaker, Kem};
use clatter::{HybridHandshake, HybridHandshakeParams, KeyPair};

/// The suite name, as clatter builds it for these type parameters.
pub const SUITE: &str = "Noise_hybridIK_X25519+MLKEM768_AESGCM_SHA256";

/// The registry's name for this channel.
pub const SECURITY_PROFILE: &str = "noise_hybrid_ik_v1";

/// The largest Noise message, handshake or transport.
pub const MAX_NOISE_MESSAGE: usize = 65_535;

/// The longest harness authorization an executor reads.
pub const MAX_AUTHORIZATION: usize = 4096;

/// Plaintext bytes in one record at most.
pub const RECORD_PLAINTEXT: usize = 61_440;

/// The largest JSON-RPC message the record layer carries.
pub const MAX_MESSAGE: usize = 64 << 20;

/// How far ahead of the next expected `seq` a record may arrive.
pub const REORDER_AHEAD: u32 = 64;

/// Bytes of records held out of order at most.
pub const REORDER_BYTES: usize = 1 << 20;

/// The AEAD tag each record adds.
const TAG: usize = 16;

/// The domain string at the head of every prologue.
const PROLOGUE_DOMAIN: &[u8] = b"codex-exec-server-relay-noise/v1";

const MLKEM768_PUBLIC_LEN: usize = 1184;

type Handshake = HybridHandshake<X25519, MlKem768, MlKem768, AesGcm, Sha256>;

/// AES-256-GCM as the Noise spec uses it (a 96-bit nonce: 32 zero bits,
/// then the 64-bit counter big-endian; 16-byte tags), computed by ring.
/// The same bytes as clatter's own `AesGcm` (the tests compare them), at
/// several times its speed on records.
#[derive(Clone)]
pub struct AesGcm;

impl clatter::traits::CryptoComponent for AesGcm {
    fn name() -> &'static str {
        "AESGCM"
    }
}

impl AesGcm {
    fn key(
        k: &SensitiveByteArray<[u8; 32]>,
    ) -> Result<ring::aead::LessSafeKey, clatter::error::CipherError> {
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, k.as_slice())
            .map(ring::aead::LessSafeKey::new)
            .map_err(|_| clatter::error::CipherError::Encrypt)
    }

    fn nonce(n: u64) -> ring::aead::Nonce {
        let mut full = [0u8; 12];
        full[4..].copy_from_slice(&n.to_be_bytes());
        ring::aead::Nonce::assume_unique_for_key(full)
    }
}

impl clatter::traits::Cipher for AesGcm {
    type Key = SensitiveByteArray<[u8; 32]>;

    fn tag_len() -> usize {
        TAG
    }

    fn encrypt(
        k: &Self::Key,
        nonce: u64,
        ad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> clatter::error::CipherResult<()> {
        if out.len() != plaintext.len() + TAG {
            return Err(clatter::error::CipherError::Encrypt);
        }
        out[..plaintext.len()].copy_from_slice(plaintext);
        Self::encrypt_in_place(k, nonce, ad, out, plaintext.len()).map(|_| ())
    }

    fn encrypt_in_place(
        k: &Self::Key,
        nonce: u64,
        ad: &[u8],
        in_out: &mut [u8],
        plaintext_len: usize,
    ) -> clatter::error::CipherResult<usize> {
        let out_len = plaintext_len + TAG;
        if in_out.len() < out_len {
            return Err(clatter::error::CipherError::Encrypt);
        }
        let (buffer, tag_out) = in_out[..out_len].split_at_mut(plaintext_len);
        let tag = Self::key(k)?
            .seal_in_place_separate_tag(Self::nonce(nonce), ring::aead::Aad::from(ad), buffer)
            .map_err(|_| clatter::error::CipherError::Encrypt)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(out_len)
    }

    fn decrypt(
        k: &Self::Key,
        nonce: u64,
        ad: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> clatter::error::CipherResult<()> {
        if ciphertext.len() != out.len() + TAG {
            return Err(clatter::error::CipherError::Decrypt);
        }
        let mut whole = ciphertext.to_vec();
        let n = Self::decrypt_in_place(k, nonce, ad, &mut whole, ciphertext.len())?;
        out.copy_from_slice(&whole[..n]);
        Ok(())
    }

    fn decrypt_in_place(
        k: &Self::Key,
        nonce: u64,
        ad: &[u8],
        in_out: &mut [u8],
        ciphertext_len: usize,
    ) -> clatter::error::CipherResult<usize> {
        if ciphertext_len > in_out.len() || ciphertext_len < TAG {
            return Err(clatter::error::CipherError::Decrypt);
        }
        let key = Self::key(k).map_err(|_| clatter::error::CipherError::Decrypt)?;
        let plain = key
            .open_in_place(
                Self::nonce(nonce),
                ring::aead::Aad::from(ad),
                &mut in_out[..ciphertext_len],
            )
            .map_err(|_| clatter::error::CipherError::Decrypt)?;
        Ok(plain.len())
    }
}
type Params<'a> = HybridHandshakeParams<'a, X25519, MlKem768, MlKem768>;
type Transport = clatter::transportstate::TransportState<AesGcm, Sha256>;
type DhPair = KeyPair<[u8; 32], SensitiveByteArray<[u8; 32]>>;
type KemPair = KeyPair<HeapArray<1184>, SensitiveByteArray<HeapArray<2400>>>;

/// Why the channel failed. The texts say what broke, never a key or a
/// payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoiseError {
    /// A key of the registry's JSON is not one of ours.
    #[error("unsupported Noise channel suite")]
    Suite,
    /// A key of the wrong length or not base64.
    #[error("invalid Noise public key: {0}")]
    Key(&'static str),
    /// The handshake failed (wrong key, wrong prologue, tampering).
    #[error("Noise handshake failed: {0}")]
    Handshake(String),
    /// Message 2 carried a payload.
    #[error("handshake response payload must be empty")]
    ResponsePayload,
    /// A handshake payload too long to send.
    #[error("Noise handshake payload is too large")]
    PayloadTooLarge,
    /// A record that fails to decrypt (tampered, replayed, reordered).
    #[error("Noise relay record failed to decrypt")]
    Decrypt,
    /// A record too large for a Noise message, or with too much plaintext.
    #[error("Noise relay record is too large")]
    RecordTooLarge,
    /// A declared message length of 0 or past the limit.
    #[error("Noise relay message length {0} is out of range")]
    MessageLength(usize),
    /// A message that is not JSON.
    #[error("Noise relay message is not valid JSON")]
    NotJson,
    /// A record too far ahead, or too much held out of order.
    #[error("Noise relay reorder window exceeded")]
    Reorder,
    /// The 32-bit record counter ran out.
    #[error("Noise relay sequence number exhausted")]
    SeqExhausted,
}

/// A static identity: the X25519 and ML-KEM-768 key pairs. The executor
/// makes one per process and never writes it anywhere.
#[derive(Clone)]
pub struct Identity {
    dh: DhPair,
    kem: KemPair,
}

/// A peer's public keys, checked for length.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "KeyJson", into = "KeyJson")]
pub struct PublicKey {
    x25519: [u8; 32],
    mlkem768: Vec<u8>,
}

/// The registry's JSON for a public key.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyJson {
    suite: String,
    x25519_public_key: String,
    mlkem768_public_key: String,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A fingerprint is enough to tell keys apart in a log.
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl TryFrom<KeyJson> for PublicKey {
    type Error = NoiseError;

    fn try_from(json: KeyJson) -> Result<Self, NoiseError> {
        if json.suite != SUITE {
            return Err(NoiseError::Suite);
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let x25519 = b64
            .decode(json.x25519_public_key)
            .map_err(|_| NoiseError::Key("x25519_public_key is not base64"))?;
        let mlkem768 = b64
            .decode(json.mlkem768_public_key)
            .map_err(|_| NoiseError::Key("mlkem768_public_key is not base64"))?;
        let x25519: [u8; 32] = x25519
            .try_into()
            .map_err(|_| NoiseError::Key("x25519_public_key must be 32 bytes"))?;
        if mlkem768.len() != MLKEM768_PUBLIC_LEN {
            return Err(NoiseError::Key("mlkem768_public_key must be 1184 bytes"));
        }
        Ok(PublicKey { x25519, mlkem768 })
    }
}

impl From<PublicKey> for KeyJson {
    fn from(key: PublicKey) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        KeyJson {
            suite: SUITE.into(),
            x25519_public_key: b64.encode(key.x25519),
            mlkem768_public_key: b64.encode(&key.mlkem768),
        }
    }
}

impl PublicKey {
    /// The first bytes of the SHA-256 of both keys, in hex: names a key in
    /// a log without the key.
    pub fn fingerprint(&self) -> String {
        use clatter::traits::Hash as _;
        let mut hash = Sha256::default();
        hash.input(&self.x25519);
        hash.input(&self.mlkem768);
        let digest = hash.result();
        digest.as_slice()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Both keys, for a MAC over them (the relay binds authorizations to
    /// a harness key).
    pub fn bytes(&self) -> Vec<u8> {
        let mut all = self.x25519.to_vec();
        all.extend_from_slice(&self.mlkem768);
        all
    }
}

impl Identity {
    /// A new identity from the system's randomness.
    pub fn generate() -> Result<Identity, NoiseError> {
        let dh = X25519::genkey().map_err(|_| NoiseError::Handshake("x25519 keygen".into()))?;
        let kem = MlKem768::genkey().map_err(|_| NoiseError::Handshake("ml-kem keygen".into()))?;
        Ok(Identity { dh, kem })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            x25519: self.dh.public,
            mlkem768: self.kem.public.as_slice().to_vec(),
        }
    }
}

/// The prologue of §4.3: four length-prefixed parts (8-byte big-endian
/// lengths), so no two id triples can give the same bytes.
pub fn prologue(environment_id: &str, registration_id: &str, stream_id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [
        PROLOGUE_DOMAIN,
        environment_id.as_bytes(),
        registration_id.as_bytes(),
        stream_id.as_bytes(),
    ] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn failed(err: impl std::fmt::Debug) -> NoiseError {
    NoiseError::Handshake(format!("{err:?}"))
}

/// The harness's side of the handshake.
pub struct Initiator {
    handshake: Handshake,
}

impl Initiator {
    /// A handshake with the executor whose keys are `executor` (pinned:
    /// the handshake fails unless the responder holds their private keys).
    pub fn new(
        identity: &Identity,
        executor: &PublicKey,
        prologue: &[u8],
    ) -> Result<Initiator, NoiseError> {
        let params = Params::new(clatter::handshakepattern::noise_hybrid_ik(), true)
            .with_prologue(prologue)
            .with_s(identity.dh.clone())
            .with_s_kem(identity.kem.clone())
            .with_rs(executor.x25519)
            .with_rs_kem(HeapArray::from_slice(&executor.mlkem768));
        Ok(Initiator {
            handshake: Handshake::new(params).map_err(failed)?,
        })
    }

    /// Message 1, carrying `authorization` encrypted.
    pub fn first_message(&mut self, authorization: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let overhead = self.handshake.get_next_message_overhead().map_err(failed)?;
        if authorization.len() + overhead > MAX_NOISE_MESSAGE {
            return Err(NoiseError::PayloadTooLarge);
        }
        let mut out = vec![0; authorization.len() + overhead];
        let n = self
            .handshake
            .write_message(authorization, &mut out)
            .map_err(failed)?;
        out.truncate(n);
        Ok(out)
    }

    /// Read message 2; its payload must be empty.
    pub fn finish(mut self, message: &[u8]) -> Result<Channel, NoiseError> {
        if message.len() > MAX_NOISE_MESSAGE {
            return Err(NoiseError::Handshake("message 2 is too long".into()));
        }
        let mut payload = vec![0; message.len()];
        let n = self
            .handshake
            .read_message(message, &mut payload)
            .map_err(failed)?;
        if n != 0 {
            return Err(NoiseError::ResponsePayload);
        }
        Channel::new(self.handshake)
    }
}

/// The executor's side of the handshake.
pub struct Responder {
    handshake: Handshake,
}

impl Responder {
    /// A handshake bound to `prologue`.
    pub fn new(identity: &Identity, prologue: &[u8]) -> Result<Responder, NoiseError> {
        let params = Params::new(clatter::handshakepattern::noise_hybrid_ik(), false)
            .with_prologue(prologue)
            .with_s(identity.dh.clone())
            .with_s_kem(identity.kem.clone());
        Ok(Responder {
            handshake: Handshake::new(params).map_err(failed)?,
        })
    }

    /// Read message 1: the harness's authenticated static key and the
    /// authorization it carried.
    pub fn read_first(&mut self, message: &[u8]) -> Result<(PublicKey, Vec<u8>), NoiseError> {
        if message.len() > MAX_NOISE_MESSAGE {
            return Err(NoiseError::Handshake("message 1 is too long".into()));
        }
        let mut payload = vec![0; message.len()];
        let n = self
            .handshake
            .read_message(message, &mut payload)
            .map_err(failed)?;
        payload.truncate(n);
        let remote = self
            .handshake
            .get_remote_static()
            .ok_or_else(|| NoiseError::Handshake("no initiator key".into()))?;
        let key = PublicKey {
            x25519: *remote.dh(),
            mlkem768: remote.kem().as_slice().to_vec(),
        };
        Ok((key, payload))
    }

    /// Message 2 (empty payload), and the channel.
    pub fn reply(mut self) -> Result<(Vec<u8>, Channel), NoiseError> {
        let overhead = self.handshake.get_next_message_overhead().map_err(failed)?;
        let mut out = vec![0; overhead];
        let n = self
            .handshake
            .write_message(&[], &mut out)
            .map_err(failed)?;
        out.truncate(n);
        Ok((out, Channel::new(self.handshake)?))
    }
}

/// Both directions of an established stream: sealing messages into
/// records, and opening records into messages.
pub struct Channel {
    transport: Transport,
    /// The next outbound record's seq; `None` once all 2^32 are used.
    send_seq: Option<u32>,
    reorder: Reorder,
    /// The length prefix of the message being received, while it is
    /// incomplete (fewer than 4 bytes).
    head: Vec<u8>,
    /// The declared length of the message being received, once its prefix
    /// is whole.
    expect: Option<usize>,
    /// The message being received, without its prefix.
    body: Vec<u8>,
    /// Messages that are binary frames (a NUL first) pass as they are.
    frames: bool,
}

impl Channel {
    fn new(handshake: Handshake) -> Result<Channel, NoiseError> {
        Ok(Channel {
            transport: handshake.finalize().map_err(failed)?,
            send_seq: Some(0),
            reorder: Reorder::default(),
            head: Vec::with_capacity(4),
            expect: None,
            body: Vec::new(),
            frames: false,
        })
    }

    /// One JSON-RPC message as records: `(seq, ciphertext)`, each at most
    /// [`RECORD_PLAINTEXT`] + 16 bytes.
    pub fn seal(&mut self, json: &[u8]) -> Result<Vec<(u32, Vec<u8>)>, NoiseError> {
        let mut records = Vec::new();
        self.seal_each(
            &[json],
            |_, payload| Vec::with_capacity(payload),
            |seq, record| records.push((seq, record)),
        )?;
        Ok(records)
    }

    /// One JSON-RPC message as whole relay frames of `stream` (the bytes
    /// of [`RelayMessageFrame::data`](super::frame::RelayMessageFrame::data)'s
    /// encoding): each record is sealed in place inside its frame's buffer,
    /// so the message is copied once, not twice.
    pub fn seal_frames(
        &mut self,
        stream: &str,
        message: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>, NoiseError> {
        let mut frames = Vec::new();
        self.seal_each(
            message,
            |seq, payload| super::frame::data_frame_head(stream, seq, payload),
            |_, frame| frames.push(frame),
        )?;
        Ok(frames)
    }

    /// Cut `length ‖ message` (the message in `parts`, one after the
    /// other) into records; each is appended to the buffer
    /// `head(seq, record length)` returns, sealed there, and given to
    /// `emit`.
    fn seal_each(
        &mut self,
        parts: &[&[u8]],
        mut head: impl FnMut(u32, usize) -> Vec<u8>,
        mut emit: impl FnMut(u32, Vec<u8>),
    ) -> Result<(), NoiseError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 || len > MAX_MESSAGE {
            return Err(NoiseError::MessageLength(len));
        }
        let prefix = (len as u32).to_be_bytes();
        let mut pieces = std::iter::once(&prefix[..])
            .chain(parts.iter().copied())
            .filter(|p| !p.is_empty());
        let mut piece: &[u8] = &[];
        let mut left = len + 4;
        while left > 0 {
            let take = left.min(RECORD_PLAINTEXT);
            left -= take;
            let seq = self.send_seq.ok_or(NoiseError::SeqExhausted)?;
            self.send_seq = seq.checked_add(1);
            let mut buf = head(seq, take + TAG);
            let start = buf.len();
            let mut need = take;
            while need > 0 {
                if piece.is_empty() {
                    piece = pieces.next().ok_or(NoiseError::MessageLength(len))?;
                }
                let n = need.min(piece.len());
                buf.extend_from_slice(&piece[..n]);
                piece = &piece[n..];
                need -= n;
            }
            buf.resize(start + take + TAG, 0);
            self.transport
                .send_in_place(&mut buf[start..], take)
                .map_err(|_| NoiseError::Decrypt)?;
            emit(seq, buf);
        }
        Ok(())
    }

    /// Take the record numbered `seq`; the whole messages it (and any
    /// records it made contiguous) completes, in order. Duplicates are
    /// dropped without a word; every other fault ends the stream.
    pub fn open(&mut self, seq: u32, record: Vec<u8>) -> Result<Vec<Vec<u8>>, NoiseError> {
        if record.len() > MAX_NOISE_MESSAGE {
            return Err(NoiseError::RecordTooLarge);
        }
        let mut messages = Vec::new();
        for mut record in self.reorder.push(seq, record)? {
            if record.len() < TAG || record.len() - TAG > RECORD_PLAINTEXT {
                return Err(NoiseError::RecordTooLarge);
            }
            let len = record.len();
            let n = self
                .transport
                .receive_in_place(&mut record, len)
                .map_err(|_| NoiseError::Decrypt)?;
            self.take_messages(&record[..n], &mut messages)?;
        }
        Ok(messages)
    }

    /// Let messages that are binary frames (`docs/PROTOCOL.md` section 11:
    /// a NUL byte first, which no JSON text has) through: for a client that
    /// asked the executor for frames. Everything else must still be JSON.
    pub fn accept_frames(&mut self) {
        self.frames = true;
    }

    /// [`Channel::open`] for a record that lies in someone else's buffer:
    /// in order and inside the message being received (every record of a
    /// large message but its first), it is copied once, straight to the
    /// message's end, and decrypted there; otherwise it takes the general
    /// way.
    pub fn open_from(&mut self, seq: u32, record: &[u8]) -> Result<Vec<Vec<u8>>, NoiseError> {
        let in_order = u64::from(seq) == self.reorder.next && self.reorder.held.is_empty();
        let inside = self
            .expect
            .is_some_and(|len| record.len() >= TAG && len - self.body.len() >= record.len() - TAG);
        if !in_order || !inside || record.len() - TAG > RECORD_PLAINTEXT {
            return self.open(seq, record.to_vec());
        }
        self.reorder.next += 1;
        let start = self.body.len();
        self.body.extend_from_slice(record);
        let n = self
            .transport
            .receive_in_place(&mut self.body[start..], record.len())
            .map_err(|_| NoiseError::Decrypt)?;
        self.body.truncate(start + n);
        let mut messages = Vec::new();
        self.take_messages(&[], &mut messages)?;
        Ok(messages)
    }

    /// Add decrypted bytes; whole messages go to `out`.
    fn take_messages(
        &mut self,
        mut plain: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), NoiseError> {
        loop {
            if let Some(len) = self.expect {
                let take = (len - self.body.len()).min(plain.len());
                self.body.extend_from_slice(&plain[..take]);
                plain = &plain[take..];
                if self.body.len() < len {
                    return Ok(());
                }
                let message = std::mem::take(&mut self.body);
                self.expect = None;
                let frame = self.frames && message.first() == Some(&0);
                if !frame && serde_json::from_slice::<serde::de::IgnoredAny>(&message).is_err() {
                    return Err(NoiseError::NotJson);
                }
                out.push(message);
            }
            if plain.is_empty() {
                return Ok(());
            }
            let take = (4 - self.head.len()).min(plain.len());
            self.head.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
            if self.head.len() == 4 {
                let head: [u8; 4] = self.head[..].try_into().unwrap_or_default();
                let len = u32::from_be_bytes(head) as usize;
                // Checked as soon as the prefix is whole, before any of
                // the message arrives.
                if len == 0 || len > MAX_MESSAGE {
                    return Err(NoiseError::MessageLength(len));
                }
                self.head.clear();
                self.expect = Some(len);
                // Room for what is said to come, up to 2 MiB at once (a
                // declared length alone reserves no 64 MiB).
                self.body.reserve_exact(len.min(2 << 20));
            }
        }
    }
}

/// Records held until their turn.
#[derive(Default)]
struct Reorder {
    /// The next seq to release; 2^32 once every seq was released.
    next: u64,
    held: BTreeMap<u32, Vec<u8>>,
    held_bytes: usize,
}

impl Reorder {
    /// The records now releasable, in order.
    fn push(&mut self, seq: u32, record: Vec<u8>) -> Result<Vec<Vec<u8>>, NoiseError> {
        let seq64 = u64::from(seq);
        if seq64 < self.next || self.held.contains_key(&seq) {
            // A duplicate: the first copy wins.
            return Ok(Vec::new());
        }
        if seq64 - self.next > u64::from(REORDER_AHEAD) {
            return Err(NoiseError::Reorder);
        }
        if seq64 != self.next {
            if self.held_bytes + record.len() > REORDER_BYTES {
                return Err(NoiseError::Reorder);
            }
            self.held_bytes += record.len();
            self.held.insert(seq, record);
            return Ok(Vec::new());
        }
        let mut out = vec![record];
        self.next += 1;
        while let Some(next) = u32::try_from(self.next)
            .ok()
            .and_then(|n| self.held.remove(&n))
        {
            self.held_bytes -= next.len();
            out.push(next);
            self.next += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authorization: &[u8]) -> (Channel, Channel, PublicKey, Vec<u8>) {
        let executor = Identity::generate().unwrap();
        let harness = Identity::generate().unwrap();
        let p = prologue("env-1", "registration-1", "stream-1");
        let mut initiator = Initiator::new(&harness, &executor.public(), &p).unwrap();
        let mut responder = Responder::new(&executor, &p).unwrap();
        let m1 = initiator.first_message(authorization).unwrap();
        let (seen, authz) = responder.read_first(&m1).unwrap();
        assert_eq!(seen, harness.public());
        let (m2, exec_channel) = responder.reply().unwrap();
        let harness_channel = initiator.finish(&m2).unwrap();
        (harness_channel, exec_channel, seen, authz)
    }

    #[test]
    fn ring_aes_gcm_gives_the_bytes_of_clatters_own() {
        use clatter::traits::Cipher as _;
        type Theirs = clatter::crypto::cipher::AesGcm;
        let key = SensitiveByteArray::new([7u8; 32]);
        for (nonce, len) in [(0u64, 0usize), (1, 1), (2, 61_440), (u64::MAX - 1, 1000)] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let (mut ours, mut theirs) = (vec![0; len + TAG], vec![0; len + TAG]);
            AesGcm::encrypt(&key, nonce, b"ad", &plain, &mut ours).unwrap();
            Theirs::encrypt(&key, nonce, b"ad", &plain, &mut theirs).unwrap();
            assert_eq!(ours, theirs, "nonce {nonce}, {len} bytes");
            let mut back = vec![0; len];
            AesGcm::decrypt(&key, nonce, b"ad", &theirs, &mut back).unwrap();
            assert_eq!(back, plain);
            theirs[0] ^= 1;
            if len > 0 {
                assert!(AesGcm::decrypt(&key, nonce, b"ad", &theirs, &mut back).is_err());
            }
        }
        // A whole handshake and records between an end built on clatter's
        // cipher and one built on ours.
        type TheirHandshake = HybridHandshake<X25519, MlKem768, MlKem768, Theirs, Sha256>;
        let executor = Identity::generate().unwrap();
        let harness = Identity::generate().unwrap();
        let p = prologue("e", "r", "s");
        let params = Params::new(clatter::handshakepattern::noise_hybrid_ik(), true)
            .with_prologue(&p)
            .with_s(harness.dh.clone())
            .with_s_kem(harness.kem.clone())
            .with_rs(executor.public().x25519)
            .with_rs_kem(HeapArray::from_slice(&executor.public().mlkem768));
        let mut theirs = TheirHandshake::new(params).unwrap();
        let mut m1 = vec![0; 8000];
        let n = theirs.write_message(b"authz", &mut m1).unwrap();
        let mut responder = Responder::new(&executor, &p).unwrap();
        let (_, authz) = responder.read_first(&m1[..n]).unwrap();
        assert_eq!(authz, b"authz");
        let (m2, mut ours) = responder.reply().unwrap();
        let mut empty = vec![0; m2.len()];
        assert_eq!(theirs.read_message(&m2, &mut empty).unwrap(), 0);
        let mut their_transport = theirs.finalize().unwrap();
        let records = ours.seal(br#"{"ok":true}"#).unwrap();
        let mut plain = vec![0; records[0].1.len() - TAG];
        let n = their_transport.receive(&records[0].1, &mut plain).unwrap();
        assert_eq!(&plain[4..n], br#"{"ok":true}"#);
    }

    #[test]
    fn the_prologue_has_the_documented_bytes() {
        let p = prologue("env-1", "registration-1", "stream-1");
        let mut expected = Vec::new();
        for (len, part) in [
            (32u8, &b"codex-exec-server-relay-noise/v1"[..]),
            (5, b"env-1"),
            (14, b"registration-1"),
            (8, b"stream-1"),
        ] {
            expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, len]);
            expected.extend_from_slice(part);
        }
        assert_eq!(p, expected);
        // Unambiguous: moving a byte between parts changes the prologue.
        assert_ne!(prologue("ab", "c", "d"), prologue("a", "bc", "d"));
    }

    #[test]
    fn a_handshake_authenticates_both_ends_and_carries_the_authorization() {
        let (mut harness, mut executor, _, authz) = connect(b"token-xyz");
        assert_eq!(authz, b"token-xyz");
        let records = harness.seal(br#"{"id":1,"method":"initialize"}"#).unwrap();
        assert_eq!(records.len(), 1);
        let (seq, record) = records.into_iter().next().unwrap();
        assert!(!record.windows(10).any(|w| w == b"initialize"));
        let got = executor.open(seq, record).unwrap();
        assert_eq!(got, vec![br#"{"id":1,"method":"initialize"}"#.to_vec()]);
        let back = executor.seal(br#"{"id":1,"result":{}}"#).unwrap();
        let (seq, record) = back.into_iter().next().unwrap();
        assert_eq!(
            harness.open(seq, record).unwrap(),
            vec![br#"{"id":1,"result":{}}"#.to_vec()]
        );
    }

    #[test]
    fn the_wrong_executor_key_fails_the_handshake() {
        let executor = Identity::generate().unwrap();
        let impostor = Identity::generate().unwrap();
        let harness = Identity::generate().unwrap();
        let p = prologue("e", "r", "s");
        // The harness pinned the real executor's key; the impostor answers.
        let mut initiator = Initiator::new(&harness, &executor.public(), &p).unwrap();
        let mut responder = Responder::new(&impostor, &p).unwrap();
        let m1 = initiator.first_message(b"a").unwrap();
        assert!(responder.read_first(&m1).is_err());
    }

    #[test]
    fn a_mismatched_prologue_fails_message_one() {
        let executor = Identity::generate().unwrap();
        let harness = Identity::generate().unwrap();
        let mut initiator =
            Initiator::new(&harness, &executor.public(), &prologue("e", "r", "s1")).unwrap();
        let mut responder = Responder::new(&executor, &prologue("e", "r", "s2")).unwrap();
        let m1 = initiator.first_message(b"a").unwrap();
        assert!(responder.read_first(&m1).is_err());
    }

    #[test]
    fn tampered_and_replayed_records_are_rejected() {
        let (mut harness, mut executor, _, _) = connect(b"a");
        let mut records = harness.seal(br#"{"a":1}"#).unwrap();
        records.extend(harness.seal(br#"{"b":2}"#).unwrap());
        let (seq0, r0) = records[0].clone();
        let (seq1, mut r1) = records[1].clone();
        assert_eq!(executor.open(seq0, r0.clone()).unwrap().len(), 1);
        // The same record again under its seq: dropped as a duplicate.
        assert_eq!(
            executor.open(seq0, r0.clone()).unwrap(),
            Vec::<Vec<u8>>::new()
        );
        // Replayed under a fresh seq: the nonce does not match.
        let (mut h2, mut e2, _, _) = connect(b"a");
        let first = h2.seal(br#"{"a":1}"#).unwrap().remove(0).1;
        assert_eq!(e2.open(0, first.clone()).unwrap().len(), 1);
        assert_eq!(e2.open(1, first), Err(NoiseError::Decrypt));
        // One flipped bit: the tag fails.
        r1[3] ^= 1;
        assert_eq!(executor.open(seq1, r1), Err(NoiseError::Decrypt));
    }

    #[test]
    fn frames_sealed_in_place_are_the_encoding_of_data_frames() {
        let (mut harness, mut executor, _, _) = connect(b"a");
        let body = format!(r#"{{"x":"{}"}}"#, "z".repeat(130_000));
        let (a, b) = body.as_bytes().split_at(70_001);
        let frames = harness.seal_frames("stream-1", &[a, b]).unwrap();
        assert_eq!(frames.len(), (4 + body.len()).div_ceil(RECORD_PLAINTEXT));
        let mut out = Vec::new();
        for (i, bytes) in frames.iter().enumerate() {
            let frame = super::super::frame::RelayMessageFrame::decode_valid(bytes).unwrap();
            // Byte for byte what prost makes of the same frame.
            assert_eq!(&frame.encode(), bytes);
            let Some(super::super::frame::Body::Data(data)) = frame.body else {
                panic!("not data");
            };
            assert_eq!((frame.stream_id.as_str(), data.seq), ("stream-1", i as u32));
            out.extend(executor.open(data.seq, data.payload).unwrap());
        }
        assert_eq!(out, vec![body.into_bytes()]);
        // The next message goes on from the next seq.
        let more = harness.seal(b"{}").unwrap();
        assert_eq!(more[0].0, frames.len() as u32);
    }

    #[test]
    fn a_large_message_spans_records_and_reassembles() {
        let (mut harness, mut executor, _, _) = connect(b"a");
        let body = format!(r#"{{"x":"{}"}}"#, "y".repeat(120 * 1024));
        let records = harness.seal(body.as_bytes()).unwrap();
        // 4 + 122,888 bytes in 60 KiB records: three.
        assert_eq!(records.len(), (4 + body.len()).div_ceil(RECORD_PLAINTEXT));
        assert!(
            records
                .iter()
                .all(|(_, r)| r.len() <= RECORD_PLAINTEXT + TAG)
        );
        // In order, each record from a buffer of its own: the same.
        let (mut h2, mut e2, _, _) = connect(b"a");
        let mut out = Vec::new();
        for (seq, record) in h2.seal(body.as_bytes()).unwrap() {
            out.extend(e2.open_from(seq, &record).unwrap());
        }
        for (seq, record) in h2.seal(br#"{"small":1}"#).unwrap() {
            out.extend(e2.open_from(seq, &record).unwrap());
        }
        assert_eq!(
            out,
            vec![body.clone().into_bytes(), br#"{"small":1}"#.to_vec()]
        );
        // A tampered record read this way still fails.
        let mut tampered = h2.seal(body.as_bytes()).unwrap();
        assert!(
            e2.open_from(tampered[0].0, &tampered[0].1)
                .unwrap()
                .is_empty()
        );
        tampered[1].1[100] ^= 1;
        assert_eq!(
            e2.open_from(tampered[1].0, &tampered[1].1),
            Err(NoiseError::Decrypt)
        );
        let mut out = Vec::new();
        // Arriving out of order within the window.
        let mut shuffled = records.clone();
        shuffled.reverse();
        for (seq, record) in shuffled {
            out.extend(executor.open(seq, record).unwrap());
        }
        assert_eq!(out, vec![body.into_bytes()]);
    }

    #[test]
    fn the_reorder_window_is_bounded_both_ways() {
        let mut window = Reorder::default();
        assert_eq!(window.push(65, vec![1]), Err(NoiseError::Reorder));
        let mut window = Reorder::default();
        for seq in 1..=11 {
            let got = window.push(seq, vec![0; 100_000]);
            if seq < 11 {
                assert!(got.unwrap().is_empty());
            } else {
                // 11 * 100,000 bytes held: past 1 MiB.
                assert_eq!(got, Err(NoiseError::Reorder));
            }
        }
        // Releasing in order; a duplicate of a held record is dropped and
        // the first copy is the one released.
        let mut window = Reorder::default();
        assert!(window.push(1, vec![1]).unwrap().is_empty());
        assert!(window.push(1, vec![9]).unwrap().is_empty());
        assert_eq!(window.push(0, vec![0]).unwrap(), vec![vec![0], vec![1]]);
    }

    #[test]
    fn declared_lengths_are_checked_before_the_payload_arrives() {
        let (mut harness, mut executor, _, _) = connect(b"a");
        // A record whose plaintext declares 64 MiB + 1.
        let raw = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
        let mut sealed = vec![0; raw.len() + TAG];
        harness.transport.send(&raw, &mut sealed).unwrap();
        harness.send_seq = Some(1);
        assert_eq!(
            executor.open(0, sealed),
            Err(NoiseError::MessageLength(MAX_MESSAGE + 1))
        );
        // Not JSON.
        let (mut h, mut e, _, _) = connect(b"a");
        let (seq, r) = h.seal(b"not json").unwrap().remove(0);
        assert_eq!(e.open(seq, r), Err(NoiseError::NotJson));
        // A frame passes only where frames were asked for.
        let (mut h, mut e, _, _) = connect(b"a");
        let (seq, r) = h.seal(b"\0frame bytes").unwrap().remove(0);
        assert_eq!(e.open(seq, r), Err(NoiseError::NotJson));
        let (mut h, mut e, _, _) = connect(b"a");
        e.accept_frames();
        let (seq, r) = h.seal(b"\0frame bytes").unwrap().remove(0);
        assert_eq!(e.open(seq, r).unwrap(), vec![b"\0frame bytes".to_vec()]);
        let (seq, r) = h.seal(b"still not json").unwrap().remove(0);
        assert_eq!(e.open(seq, r), Err(NoiseError::NotJson));
        // Many messages in one record.
        let (mut h, mut e, _, _) = connect(b"a");
        let mut plain = Vec::new();
        for m in [&b"{}"[..], b"[1]", b"2"] {
            plain.extend_from_slice(&(m.len() as u32).to_be_bytes());
            plain.extend_from_slice(m);
        }
        let mut sealed = vec![0; plain.len() + TAG];
        h.transport.send(&plain, &mut sealed).unwrap();
        assert_eq!(e.open(0, sealed).unwrap().len(), 3);
    }

    #[test]
    fn public_keys_have_the_registry_shape_and_are_checked() {
        let key = Identity::generate().unwrap().public();
        let json = serde_json::to_value(&key).unwrap();
        assert_eq!(json["suite"], SUITE);
        assert_eq!(json.as_object().unwrap().len(), 3);
        let back: PublicKey = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, key);
        let mut other = json.clone();
        other["suite"] = "Noise_IK_25519_AESGCM_SHA256".into();
        assert!(serde_json::from_value::<PublicKey>(other).is_err());
        let mut short = json.clone();
        short["x25519_public_key"] = "AAAA".into();
        assert!(serde_json::from_value::<PublicKey>(short).is_err());
        let mut extra = json;
        extra["more"] = 1.into();
        assert!(serde_json::from_value::<PublicKey>(extra).is_err());
    }

    #[test]
    fn an_oversized_handshake_payload_is_refused_not_a_panic() {
        let executor = Identity::generate().unwrap();
        let harness = Identity::generate().unwrap();
        let mut initiator =
            Initiator::new(&harness, &executor.public(), &prologue("e", "r", "s")).unwrap();
        assert_eq!(
            initiator
                .first_message(&vec![b'a'; MAX_NOISE_MESSAGE])
                .err(),
            Some(NoiseError::PayloadTooLarge)
        );
        let mut responder = Responder::new(&executor, &prologue("e", "r", "s")).unwrap();
        assert!(
            responder
                .read_first(&vec![0; MAX_NOISE_MESSAGE + 1])
                .is_err()
        );
    }
}
