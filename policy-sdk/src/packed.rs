//! The flat encoding of backend states in contract 0.2.0
//! (`host.backend-states`): four `u64` words per node, so the host hands the
//! whole list over as one copy. The host encodes with [`encode`], the guest
//! decodes with [`decode`]; both live here so they cannot disagree.

use crate::types::Role;

/// Words per node.
pub const WORDS: usize = 4;

const HEALTHY: u64 = 1 << 40;
const REPLAYED: u64 = 1 << 41;
const LAG_KNOWN: u64 = 1 << 42;

/// One node's live state, as the contract carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub id: u32,
    pub role: Role,
    pub healthy: bool,
    pub replayed_last_write: bool,
    pub lag_ms: Option<u32>,
    pub latency_us: u32,
    pub lag_bytes: u64,
    pub in_flight: u32,
    pub idle: u32,
}

pub fn encode(s: &State) -> [u64; WORDS] {
    let role = match s.role {
        Role::Primary => 0u64,
        Role::Replica => 1,
        Role::Unknown => 2,
    };
    let mut w0 = u64::from(s.id) | (role << 32);
    if s.healthy {
        w0 |= HEALTHY;
    }
    if s.replayed_last_write {
        w0 |= REPLAYED;
    }
    if s.lag_ms.is_some() {
        w0 |= LAG_KNOWN;
    }
    [
        w0,
        u64::from(s.lag_ms.unwrap_or(0)) | (u64::from(s.latency_us) << 32),
        s.lag_bytes,
        u64::from(s.in_flight) | (u64::from(s.idle) << 32),
    ]
}

pub fn decode(w: &[u64; WORDS]) -> State {
    let role = match (w[0] >> 32) & 0b11 {
        0 => Role::Primary,
        1 => Role::Replica,
        _ => Role::Unknown,
    };
    State {
        id: w[0] as u32,
        role,
        healthy: w[0] & HEALTHY != 0,
        replayed_last_write: w[0] & REPLAYED != 0,
        lag_ms: (w[0] & LAG_KNOWN != 0).then_some(w[1] as u32),
        latency_us: (w[1] >> 32) as u32,
        lag_bytes: w[2],
        in_flight: w[3] as u32,
        idle: (w[3] >> 32) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_survives_the_round_trip() {
        let states = [
            State::default(),
            State {
                id: u32::MAX,
                role: Role::Replica,
                healthy: true,
                replayed_last_write: true,
                lag_ms: Some(u32::MAX),
                latency_us: u32::MAX,
                lag_bytes: u64::MAX,
                in_flight: u32::MAX,
                idle: u32::MAX,
            },
            State {
                id: 7,
                role: Role::Unknown,
                healthy: false,
                replayed_last_write: false,
                lag_ms: Some(0),
                latency_us: 250,
                lag_bytes: 8192,
                in_flight: 3,
                idle: 5,
            },
            State {
                role: Role::Primary,
                lag_ms: None,
                healthy: true,
                ..State::default()
            },
        ];
        for s in states {
            assert_eq!(decode(&encode(&s)), s);
        }
    }
}
