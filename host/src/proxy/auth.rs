//! Client authentication to signalbox: SCRAM-SHA-256 (RFC 5802/7677) over
//! PostgreSQL's SASL messages, with channel binding (`SCRAM-SHA-256-PLUS`,
//! `tls-server-end-point`) on TLS connections, or trust for local use.
//!
//! The exchange is ours rather than a crate's because channel binding is
//! where the crates stop: the GS2 header the client chose (`n`, `y` or
//! `p=tls-server-end-point`) must be echoed back exactly, and the binding
//! data is the hash of our own certificate. The primitives (PBKDF2, HMAC,
//! SHA-256, constant-time comparison) come from `ring`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BufMut;
use ring::{digest, hmac, pbkdf2};

use super::relay::ClientIo;
use crate::wire::{Fields, WireError};

/// The largest message a client may send before it is authenticated
/// (PostgreSQL's limit for password and SASL messages).
pub const MAX_AUTH_MESSAGE: usize = 65_535;

const ITERATIONS: u32 = 4096;
const PLUS: &str = "SCRAM-SHA-256-PLUS";
const PLAIN: &str = "SCRAM-SHA-256";

/// How authentication ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// SQLSTATE and message for a FATAL error.
    Refused(&'static str, String),
}

fn refused(code: &'static str, msg: &str) -> Verdict {
    Verdict::Refused(code, msg.to_owned())
}

/// The keys derived from one password (computed once per session, with a
/// fresh salt).
struct Keys {
    salt: [u8; 16],
    stored: [u8; 32],
    server: [u8; 32],
}

impl Keys {
    fn derive(password: &str) -> Keys {
        // PostgreSQL SASLprep-normalises passwords and falls back to the raw
        // text when normalisation fails.
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_owned());
        let mut salt = [0u8; 16];
        random(&mut salt);
        let mut salted = [0u8; 32];
        let rounds = std::num::NonZeroU32::new(ITERATIONS).unwrap_or(std::num::NonZeroU32::MIN);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let mut stored = [0u8; 32];
        stored.copy_from_slice(digest::digest(&digest::SHA256, client_key.as_ref()).as_ref());
        let mut server = [0u8; 32];
        server.copy_from_slice(hmac::sign(&key, b"Server Key").as_ref());
        Keys {
            salt,
            stored,
            server,
        }
    }
}

thread_local! {
    /// PBKDF2 derivations (4096 rounds of HMAC each) this thread ran.
    static DERIVATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Derived keys by (user, password): PBKDF2's 4096 rounds run once per
/// configured user, not on every login (an unauthenticated client could
/// otherwise make signalbox burn CPU at will). An unknown user costs no
/// derivation at all: its salt is a keyed hash of its name, so repeated
/// attempts see the same salt, as with PostgreSQL's mock authentication,
/// and its keys are random, so no proof ever matches them.
fn keys_for(user: &str, password: Option<&str>) -> std::sync::Arc<Keys> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Cache = Mutex<HashMap<(String, String), Arc<Keys>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let Some(password) = password else {
        return Arc::new(mock_keys(user));
    };
    let cache = CACHE.get_or_init(Mutex::default);
    let key = (user.to_owned(), password.to_owned());
    if let Some(k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return k.clone();
    }
    DERIVATIONS.with(|d| d.set(d.get() + 1));
    let keys = Arc::new(Keys::derive(password));
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= 10_000 {
        map.clear(); // bounded, whatever the configuration holds
    }
    map.insert(key, keys.clone());
    keys
}

/// Keys for a user signalbox does not know: a stable salt, no derivation.
fn mock_keys(user: &str) -> Keys {
    use std::sync::OnceLock;
    static SECRET: OnceLock<hmac::Key> = OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        let mut k = [0u8; 32];
        random(&mut k);
        hmac::Key::new(hmac::HMAC_SHA256, &k)
    });
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&hmac::sign(secret, user.as_bytes()).as_ref()[..16]);
    let (mut stored, mut server) = ([0u8; 32], [0u8; 32]);
    random(&mut stored);
    random(&mut server);
    Keys {
        salt,
        stored,
        server,
    }
}

fn random(buf: &mut [u8]) {
    if getrandom::getrandom(buf).is_err() {
        buf.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
}

fn auth_message(io: &mut ClientIo, code: i32, data: &[u8]) {
    io.out.put_u8(b'R');
    io.out.put_i32(8 + data.len() as i32);
    io.out.put_i32(code);
    io.out.put_slice(data);
}

/// What the client said in its first message.
#[derive(Debug, PartialEq, Eq)]
struct ClientFirst<'a> {
    /// The GS2 header exactly as sent (`n,,`, `y,,`, `p=tls-server-end-point,,`).
    header: &'a str,
    binds: bool,
    bare: &'a str,
    nonce: &'a str,
}

/// Parse and check a client-first message against the mechanism chosen and
/// whether channel binding was offered.
fn client_first<'a>(
    data: &'a str,
    mechanism: &str,
    offered_plus: bool,
) -> Result<ClientFirst<'a>, Verdict> {
    let malformed = || refused("08P01", "malformed SCRAM message");
    let (flag, rest) = data.split_once(',').ok_or_else(malformed)?;
    let (authzid, bare) = rest.split_once(',').ok_or_else(malformed)?;
    if !authzid.is_empty() {
        return Err(refused(
            "0A000",
            "client uses authorization identity, but it is not supported",
        ));
    }
    let binds = match flag {
        "n" => false,
        // The client could bind but believes we cannot: if we offered it,
        // someone removed it on the way (a downgrade).
        "y" if offered_plus => {
            return Err(refused(
                "08P01",
                "SCRAM channel binding negotiation error: the client believes the server does not support channel binding",
            ))
        }
        "y" => false,
        "p=tls-server-end-point" if offered_plus => true,
        f if f.starts_with("p=") => {
            return Err(refused(
                "08P01",
                "unsupported SCRAM channel-binding type (only tls-server-end-point, over TLS)",
            ))
        }
        _ => return Err(malformed()),
    };
    if binds != (mechanism == PLUS) {
        return Err(refused(
            "08P01",
            "SCRAM channel binding negotiation error: the mechanism and the GS2 header disagree",
        ));
    }
    let header = &data[..flag.len() + 1 + authzid.len() + 1];
    let nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        .ok_or_else(malformed)?;
    if !bare.starts_with("n=") {
        return Err(malformed());
    }
    Ok(ClientFirst {
        header,
        binds,
        bare,
        nonce,
    })
}

/// Check a client-final message; the server signature to send back when the
/// proof is right.
fn client_final(
    data: &str,
    first: &ClientFirst<'_>,
    server_first: &str,
    nonce: &str,
    end_point: Option<&[u8]>,
    keys: &Keys,
) -> Result<String, Verdict> {
    let malformed = || refused("08P01", "malformed SCRAM message");
    let (without_proof, proof) = data.rsplit_once(",p=").ok_or_else(malformed)?;
    let mut attrs = without_proof.split(',');
    let binding = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or_else(malformed)?;
    let mut expected = first.header.as_bytes().to_vec();
    if first.binds {
        expected.extend_from_slice(end_point.unwrap_or_default());
    }
    if B64.decode(binding).ok().as_deref() != Some(&expected[..]) {
        return Err(refused("08P01", "SCRAM channel binding check failed"));
    }
    if attrs.next().and_then(|a| a.strip_prefix("r=")) != Some(nonce) {
        return Err(refused("08P01", "SCRAM nonce mismatch"));
    }
    let proof = B64.decode(proof).map_err(|_| malformed())?;
    let auth = format!("{},{},{}", first.bare, server_first, without_proof);
    let stored = hmac::Key::new(hmac::HMAC_SHA256, &keys.stored);
    let signature = hmac::sign(&stored, auth.as_bytes());
    if proof.len() != 32 {
        return Err(malformed());
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(signature.as_ref())
        .map(|(p, s)| p ^ s)
        .collect();
    let computed = digest::digest(&digest::SHA256, &client_key);
    if !constant_time_eq(computed.as_ref(), &keys.stored) {
        return Err(Verdict::Refused("28P01", String::new()));
    }
    let server = hmac::Key::new(hmac::HMAC_SHA256, &keys.server);
    Ok(format!(
        "v={}",
        B64.encode(hmac::sign(&server, auth.as_bytes()))
    ))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Run SCRAM-SHA-256 with the client. `password` is the user's configured
/// password (`None`: unknown user, which fails like a wrong password).
/// `end_point`: the `tls-server-end-point` binding data when the client
/// connection is TLS (then `SCRAM-SHA-256-PLUS` is offered too).
pub async fn scram(
    io: &mut ClientIo,
    user: &str,
    password: Option<&str>,
    end_point: Option<&[u8]>,
) -> Result<Verdict, WireError> {
    let mut offer = Vec::new();
    if end_point.is_some() {
        offer.extend_from_slice(PLUS.as_bytes());
        offer.push(0);
    }
    offer.extend_from_slice(PLAIN.as_bytes());
    offer.extend_from_slice(b"\0\0");
    auth_message(io, 10, &offer);
    io.flush().await?;
    let first = io.next().await?;
    if first.tag != b'p' {
        return Ok(refused("08P01", "expected a SASL initial response"));
    }
    let mut f = Fields::new(&first.body);
    let mechanism = f.cstr()?;
    if mechanism != PLAIN && !(mechanism == PLUS && end_point.is_some()) {
        return Ok(refused(
            "08P01",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let data = f.rest().get(4..).unwrap_or_default();
    let Ok(data) = std::str::from_utf8(data) else {
        return Ok(refused("08P01", "malformed SCRAM message"));
    };
    let first = match client_first(data, mechanism, end_point.is_some()) {
        Ok(c) => c,
        Err(v) => return Ok(v),
    };
    // An unknown user still goes through the exchange (with a random
    // secret), so a client cannot tell unknown users from wrong passwords.
    let keys = keys_for(user, password);
    let mut server_nonce = [0u8; 18];
    random(&mut server_nonce);
    let nonce = format!("{}{}", first.nonce, B64.encode(server_nonce));
    let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(keys.salt));
    auth_message(io, 11, server_first.as_bytes());
    io.flush().await?;
    let fin = io.next().await?;
    if fin.tag != b'p' {
        return Ok(refused("08P01", "expected a SASL response"));
    }
    let Ok(text) = std::str::from_utf8(&fin.body) else {
        return Ok(refused("08P01", "malformed SCRAM message"));
    };
    match client_final(text, &first, &server_first, &nonce, end_point, &keys) {
        Ok(v) if password.is_some() => {
            auth_message(io, 12, v.as_bytes());
            Ok(Verdict::Ok)
        }
        Ok(_) | Err(Verdict::Refused("28P01", _)) => Ok(Verdict::Refused(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )),
        Err(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_users_cost_no_key_derivation_and_keep_their_salt() {
        let derivations = || DERIVATIONS.with(std::cell::Cell::get);
        for i in 0..100 {
            keys_for(&format!("stranger-{i}"), None);
        }
        assert_eq!(derivations(), 0);
        keys_for("someone", Some("only-this-test-uses-it"));
        assert_eq!(derivations(), 1, "a configured user's keys are derived");
        assert_eq!(
            keys_for("stranger-1", None).salt,
            keys_for("stranger-1", None).salt
        );
        assert_ne!(
            keys_for("stranger-1", None).salt,
            keys_for("stranger-2", None).salt
        );
    }

    /// A client side of the exchange, written from the RFC, to check ours.
    fn client_final_for(
        password: &str,
        header: &str,
        cbind: &[u8],
        bare: &str,
        server_first: &str,
    ) -> String {
        let parts: Vec<&str> = server_first.split(',').collect();
        let nonce = &parts[0][2..];
        let salt = B64.decode(&parts[1][2..]).unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(ITERATIONS).unwrap(),
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let mut c = header.as_bytes().to_vec();
        c.extend_from_slice(cbind);
        let without = format!("c={},r={nonce}", B64.encode(c));
        let auth = format!("{bare},{server_first},{without}");
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(sig.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        format!("{without},p={}", B64.encode(proof))
    }

    fn run(data: &str, mechanism: &str, end_point: Option<&[u8]>, password: &str) -> Verdict {
        let keys = Keys::derive("secret");
        let first = match client_first(data, mechanism, end_point.is_some()) {
            Ok(f) => f,
            Err(v) => return v,
        };
        let nonce = format!("{}SERVER", first.nonce);
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(keys.salt));
        let cbind = if first.binds {
            end_point.unwrap()
        } else {
            &[][..]
        };
        let fin = client_final_for(password, first.header, cbind, first.bare, &server_first);
        match client_final(&fin, &first, &server_first, &nonce, end_point, &keys) {
            Ok(_) => Verdict::Ok,
            Err(v) => v,
        }
    }

    #[test]
    fn gs2_flags_and_mechanisms() {
        let cert_hash = [7u8; 32];
        let tls = Some(&cert_hash[..]);
        let code = |v: Verdict| match v {
            Verdict::Ok => "ok",
            Verdict::Refused(c, _) => c,
        };
        // (client-first, mechanism, TLS?, password) → outcome
        type Case<'a> = (&'a str, &'a str, Option<&'a [u8]>, &'a str, &'a str);
        let cases: &[Case] = &[
            ("n,,n=,r=abc", PLAIN, None, "secret", "ok"),
            ("n,,n=,r=abc", PLAIN, None, "wrong", "28P01"),
            // A client able to bind that was not offered it (no TLS here).
            ("y,,n=,r=abc", PLAIN, None, "secret", "ok"),
            // ... but over TLS we offered PLUS: a downgrade.
            ("y,,n=,r=abc", PLAIN, tls, "secret", "08P01"),
            (
                "p=tls-server-end-point,,n=,r=abc",
                PLUS,
                tls,
                "secret",
                "ok",
            ),
            (
                "p=tls-server-end-point,,n=,r=abc",
                PLUS,
                tls,
                "wrong",
                "28P01",
            ),
            ("p=tls-unique,,n=,r=abc", PLUS, tls, "secret", "08P01"),
            (
                "p=tls-server-end-point,,n=,r=abc",
                PLAIN,
                tls,
                "secret",
                "08P01",
            ),
            ("n,,n=,r=abc", PLUS, tls, "secret", "08P01"),
            ("n,a=admin,n=,r=abc", PLAIN, None, "secret", "0A000"),
            ("n,,r=abc", PLAIN, None, "secret", "08P01"),
            ("x,,n=,r=abc", PLAIN, None, "secret", "08P01"),
        ];
        for (i, (data, mech, ep, pw, want)) in cases.iter().enumerate() {
            assert_eq!(code(run(data, mech, *ep, pw)), *want, "case {i}: {data}");
        }
    }

    #[test]
    fn binding_to_another_certificate_fails() {
        let keys = Keys::derive("secret");
        let ours = [1u8; 32];
        let theirs = [2u8; 32];
        let first = client_first("p=tls-server-end-point,,n=,r=abc", PLUS, true).unwrap();
        let nonce = "abcSERVER";
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(keys.salt));
        let fin = client_final_for("secret", first.header, &theirs, first.bare, &server_first);
        let v = client_final(&fin, &first, &server_first, nonce, Some(&ours), &keys);
        assert!(matches!(v, Err(Verdict::Refused("08P01", _))));
    }
}
