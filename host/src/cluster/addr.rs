//! Where a node is and how to log in to it, from its `postgres://` URL.

use std::fmt;

/// A node's address and control-plane credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// TLS towards the node (`?sslmode=`, default `prefer` as in libpq).
    pub sslmode: crate::tls::SslMode,
    /// CA certificate for `verify-ca`/`verify-full` (`?sslrootcert=`).
    pub sslrootcert: Option<std::path::PathBuf>,
}

impl fmt::Debug for NodeAddr {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

impl NodeAddr {
    pub fn parse(url: &str) -> Result<Self, String> {
        let u = url::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            return Err(format!("scheme must be postgres://, got {}://", u.scheme()));
        }
        let host = u.host_str().ok_or("URL has no host")?.to_owned();
        let decode =
            |s: &str| percent_decode(s).map_err(|_| "URL has invalid percent-encoding".to_string());
        let user = if u.username().is_empty() {
            "postgres".to_owned()
        } else {
            decode(u.username())?
        };
        let password = u.password().map(decode).transpose()?;
        let database = match u.path().trim_start_matches('/') {
            "" => user.clone(),
            db => decode(db)?,
        };
        let mut sslmode = crate::tls::SslMode::default();
        let mut sslrootcert = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "sslmode" => sslmode = crate::tls::SslMode::parse(&v)?,
                "sslrootcert" => sslrootcert = Some(std::path::PathBuf::from(v.as_ref())),
                _ => {}
            }
        }
        Ok(Self {
            host,
            port: u.port().unwrap_or(5432),
            user,
            password,
            database,
            sslmode,
            sslrootcert,
        })
    }

    pub fn socket(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let a = NodeAddr::parse("postgres://app:p%40ss@db1:5433/shop").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("db1", 5433));
        assert_eq!(a.password.as_deref(), Some("p@ss"));
        assert_eq!(a.database, "shop");
        assert!(!format!("{a:?}").contains("p@ss"));
        let b = NodeAddr::parse("postgresql://127.0.0.1").unwrap();
        assert_eq!(
            (b.user.as_str(), b.port, b.database.as_str()),
            ("postgres", 5432, "postgres")
        );
        assert!(NodeAddr::parse("mysql://x").is_err());
        let t = NodeAddr::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem").unwrap();
        assert_eq!(t.sslmode, crate::tls::SslMode::Verify);
        assert!(NodeAddr::parse("postgres://h/db?sslmode=bogus").is_err());
        assert_eq!(b.sslmode, crate::tls::SslMode::Prefer);
        assert!(NodeAddr::parse("postgres://h:notaport/db").is_err());
    }
}
