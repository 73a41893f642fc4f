//! Client authentication to signalbox: SCRAM-SHA-256 (the `scram-2` state
//! machine over PostgreSQL's SASL messages), or trust for local use.

use std::num::NonZeroU32;

use bytes::BufMut;
use scram_2::server::{AuthenticationProvider, AuthenticationStatus, PasswordInfo, ScramServer};

use super::relay::ClientIo;
use crate::wire::{Fields, WireError};

const ITERATIONS: u16 = 4096;

/// How authentication ended.
pub enum Verdict {
    Ok,
    /// SQLSTATE and message for a FATAL error.
    Refused(&'static str, String),
}

/// The salted password of one user, computed once per session.
struct Secret {
    hashed: Vec<u8>,
    salt: Vec<u8>,
}

impl AuthenticationProvider for Secret {
    // PostgreSQL clients send an empty SCRAM user name; the startup packet's
    // user is the one that counts, and the secret was chosen for it.
    fn get_password_for(&self, _username: &str) -> Option<PasswordInfo> {
        Some(PasswordInfo::new(
            self.hashed.clone(),
            ITERATIONS,
            self.salt.clone(),
        ))
    }
}

fn secret(password: &str) -> Secret {
    // PostgreSQL SASLprep-normalises passwords; fall back to the raw text
    // when normalisation fails, as PostgreSQL does.
    let prepared = stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| password.to_owned());
    let salt: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    let iterations = NonZeroU32::new(u32::from(ITERATIONS)).expect("non-zero");
    let hashed = scram_2::hash_password(&prepared, iterations, &salt);
    Secret {
        hashed: hashed.to_vec(),
        salt,
    }
}

fn auth_message(io: &mut ClientIo, code: i32, data: &[u8]) {
    io.out.put_u8(b'R');
    io.out.put_i32(8 + data.len() as i32);
    io.out.put_i32(code);
    io.out.put_slice(data);
}

/// Run SCRAM-SHA-256 with the client. `password` is the user's configured
/// password (`None`: unknown user, which fails like a wrong password).
pub async fn scram(
    io: &mut ClientIo,
    user: &str,
    password: Option<&str>,
) -> Result<Verdict, WireError> {
    let failed = || {
        Verdict::Refused(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    auth_message(io, 10, b"SCRAM-SHA-256\0\0");
    io.flush().await?;
    let first = io.next().await?;
    if first.tag != b'p' {
        return Ok(Verdict::Refused(
            "08P01",
            "expected a SASL initial response".into(),
        ));
    }
    let mut f = Fields::new(&first.body);
    if f.cstr()? != "SCRAM-SHA-256" {
        return Ok(Verdict::Refused(
            "28000",
            "only SCRAM-SHA-256 is supported".into(),
        ));
    }
    let data = f.rest().get(4..).unwrap_or_default();
    let client_first = std::str::from_utf8(data)
        .map_err(|_| WireError::Protocol("SASL data is not UTF-8".into()))?;
    // An unknown user still goes through the exchange (with a random secret),
    // so a client cannot tell unknown users from wrong passwords.
    let random_password;
    let secret = secret(match password {
        Some(p) => p,
        None => {
            random_password = format!("{:x}", fastrand::u128(..));
            &random_password
        }
    });
    let server = ScramServer::new(secret);
    let Ok(server_first) = server.handle_client_first(client_first) else {
        return Ok(Verdict::Refused(
            "08P01",
            "malformed SCRAM client-first message".into(),
        ));
    };
    let (client_final_state, server_first_msg) = server_first.server_first();
    auth_message(io, 11, server_first_msg.as_bytes());
    io.flush().await?;
    let fin = io.next().await?;
    if fin.tag != b'p' {
        return Ok(Verdict::Refused("08P01", "expected a SASL response".into()));
    }
    let client_final = std::str::from_utf8(&fin.body)
        .map_err(|_| WireError::Protocol("SASL data is not UTF-8".into()))?;
    let Ok(server_final) = client_final_state.handle_client_final(client_final) else {
        return Ok(failed());
    };
    let (status, msg) = server_final.server_final();
    if status != AuthenticationStatus::Authenticated || password.is_none() {
        return Ok(failed());
    }
    auth_message(io, 12, msg.as_bytes());
    Ok(Verdict::Ok)
}
