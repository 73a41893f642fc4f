//! The policy contract's version marker (reading and checking it), and
//! turning a policy file into a component.
//!
//! A policy file may be a component (what `signalbox policy build` writes) or
//! a core wasm module built by `cargo build --target wasm32-unknown-unknown`
//! with the SDK; the latter is encoded into a component at load.

use std::fmt;

use wasmparser::{Parser, Payload};

/// Name of the custom section holding the contract version a policy targets.
pub const ABI_SECTION: &str = "signalbox-policy-abi";

/// Contract versions this host accepts, as `(major, minor)`; for a `0.x`
/// version the minor is the breaking part (semver).
const SUPPORTED: &[(u32, u32)] = &[(0, 1), (0, 2)];

/// A contract version read from a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl AbiVersion {
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
        let v = Self {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next()??,
        };
        parts.next().is_none().then_some(v)
    }

    pub fn is_supported(&self) -> bool {
        SUPPORTED
            .iter()
            .any(|&(major, minor)| self.major == major && (major != 0 || self.minor == minor))
    }
}

/// What is wrong with a policy file before it is even compiled.
#[derive(Debug, thiserror::Error)]
pub enum AbiError {
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    #[error("malformed WebAssembly: {0}")]
    Malformed(String),
    #[error("no `{ABI_SECTION}` version marker and no signalbox:policy import: not a signalbox policy (build it with the signalbox-policy SDK)")]
    NoMarker,
    #[error("unreadable version marker {0:?}")]
    BadMarker(String),
    #[error("policy targets signalbox:policy@{found}, which this signalbox does not support (supported: {supported})")]
    Unsupported {
        found: AbiVersion,
        supported: String,
    },
    #[error("cannot encode the module as a component: {0}")]
    Encode(String),
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|(a, b)| format!("{a}.{b}.x"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Read the contract version: the marker section if present (at any nesting
/// depth), else the version in a `signalbox:policy/...@x.y.z` import name.
pub fn read_version(bytes: &[u8]) -> Result<AbiVersion, AbiError> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(AbiError::NotWasm);
    }
    let mut from_import = None;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| AbiError::Malformed(e.to_string()))? {
            Payload::CustomSection(section) if section.name() == ABI_SECTION => {
                let text = String::from_utf8_lossy(section.data()).into_owned();
                return AbiVersion::parse(&text).ok_or(AbiError::BadMarker(text));
            }
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| AbiError::Malformed(e.to_string()))?;
                    from_import = from_import.or_else(|| version_in_name(import.module));
                }
            }
            Payload::ComponentImportSection(imports) => {
                for import in imports {
                    let import = import.map_err(|e| AbiError::Malformed(e.to_string()))?;
                    from_import = from_import.or_else(|| version_in_name(import.name.name));
                }
            }
            _ => {}
        }
    }
    from_import.ok_or(AbiError::NoMarker)
}

fn version_in_name(name: &str) -> Option<AbiVersion> {
    let rest = name.strip_prefix("signalbox:policy/")?;
    AbiVersion::parse(rest.split_once('@')?.1)
}

/// Check the version is one this host runs.
pub fn check_version(version: AbiVersion) -> Result<(), AbiError> {
    if version.is_supported() {
        Ok(())
    } else {
        Err(AbiError::Unsupported {
            found: version,
            supported: supported_list(),
        })
    }
}

/// Whether `bytes` is a core module (as opposed to a component).
pub fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// A component for `bytes`: returned as is if it already is one, encoded from
/// the module's embedded component-type information otherwise.
pub fn to_component(bytes: &[u8]) -> Result<Vec<u8>, AbiError> {
    if !is_core_module(bytes) {
        return Ok(bytes.to_vec());
    }
    let encoder = wit_component::ComponentEncoder::default()
        .module(bytes)
        .map_err(|e| AbiError::Encode(format!("{e:#}")))?
        .validate(true);
    let mut encoder = encoder;
    encoder
        .encode()
        .map_err(|e| AbiError::Encode(format!("{e:#}")))
}

/// Append the version marker as a top-level custom section, so tools can read
/// it without walking nested modules.
pub fn stamp_version(component: &mut Vec<u8>, version: &str) {
    let mut payload = Vec::new();
    leb128(&mut payload, ABI_SECTION.len() as u64);
    payload.extend_from_slice(ABI_SECTION.as_bytes());
    payload.extend_from_slice(version.as_bytes());
    component.push(0); // custom section id
    leb128(component, payload.len() as u64);
    component.extend_from_slice(&payload);
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Import names of a component other than the signalbox:policy interfaces;
/// a policy gets no WASI, so any such import means it cannot be instantiated.
pub fn foreign_imports(component: &[u8]) -> Result<Vec<String>, AbiError> {
    let mut foreign = Vec::new();
    for payload in Parser::new(0).parse_all(component) {
        if let Payload::ComponentImportSection(imports) =
            payload.map_err(|e| AbiError::Malformed(e.to_string()))?
        {
            for import in imports {
                let import = import.map_err(|e| AbiError::Malformed(e.to_string()))?;
                // Type imports (the world's `use types.{...}`) are not capabilities.
                let is_type = matches!(import.ty, wasmparser::ComponentTypeRef::Type(_));
                if !is_type && !import.name.name.starts_with("signalbox:policy/") {
                    foreign.push(import.name.name.to_owned());
                }
            }
        }
    }
    Ok(foreign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = AbiVersion::parse("0.1.0").unwrap();
        assert!(v.is_supported());
        assert!(AbiVersion::parse("0.2.0").unwrap().is_supported());
        assert!(!AbiVersion::parse("0.3.0").unwrap().is_supported());
        assert!(!AbiVersion::parse("9.1.0").unwrap().is_supported());
        assert!(AbiVersion::parse("0.1").is_none());
        assert!(AbiVersion::parse("0.1.0.0").is_none());
        assert_eq!(
            version_in_name("signalbox:policy/host@0.1.0"),
            Some(AbiVersion {
                major: 0,
                minor: 1,
                patch: 0
            })
        );
    }

    #[test]
    fn not_wasm() {
        assert!(matches!(
            read_version(b"hello world!"),
            Err(AbiError::NotWasm)
        ));
    }

    #[test]
    fn stamped_marker_is_read() {
        // An empty component, stamped.
        let mut c = vec![0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        stamp_version(&mut c, "0.1.3");
        assert_eq!(read_version(&c).unwrap().patch, 3);
        let mut c = vec![0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        stamp_version(&mut c, "7.0.0");
        let err = check_version(read_version(&c).unwrap()).unwrap_err();
        assert!(err.to_string().contains("signalbox:policy@7.0.0"), "{err}");
    }
}
