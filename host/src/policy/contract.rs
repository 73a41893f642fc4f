//! The contract versions this host speaks, one module each: bindings
//! generated from that version's frozen WIT folder, the host imports, and
//! the conversion of the host's routing input and of the policy's decision.
//! A policy's version marker picks the module ([`Pre::new`]); a new contract
//! version is a new file here and a line in [`super::abi`]'s supported list.

pub mod v0_1;
pub mod v0_2;

use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::Store;

use super::abi::AbiVersion;
use super::instance::HostState;
use crate::route::{RouteInput, StatementKind, Target};

/// A compiled policy ready to instantiate, in its contract version.
pub enum Pre {
    V0_1(v0_1::PolicyPre<HostState>),
    V0_2(v0_2::PolicyPre<HostState>),
}

/// One instance's exports, in its contract version.
pub enum Bindings {
    V0_1(v0_1::Policy),
    V0_2(v0_2::Policy),
}

/// The host imports of every version (their names differ by version, so
/// one linker serves them all).
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    v0_1::Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    v0_2::Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

impl Pre {
    pub fn new(version: AbiVersion, pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        Ok(match (version.major, version.minor) {
            (0, 1) => Pre::V0_1(v0_1::PolicyPre::new(pre)?),
            _ => Pre::V0_2(v0_2::PolicyPre::new(pre)?),
        })
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        match self {
            Pre::V0_1(p) => p.engine(),
            Pre::V0_2(p) => p.engine(),
        }
    }

    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::V0_1(p) => Bindings::V0_1(p.instantiate(store)?),
            Pre::V0_2(p) => Bindings::V0_2(p.instantiate(store)?),
        })
    }
}

impl Bindings {
    pub fn init(
        &self,
        store: &mut Store<HostState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bindings::V0_1(b) => b.call_init(store, config),
            Bindings::V0_2(b) => b.call_init(store, config),
        }
    }

    /// Call `route`; the decision's target and reason, not yet validated.
    pub fn route(
        &self,
        store: &mut Store<HostState>,
        input: &RouteInput,
    ) -> wasmtime::Result<(Target, Option<String>)> {
        match self {
            Bindings::V0_1(b) => v0_1::route(b, store, input),
            Bindings::V0_2(b) => v0_2::route(b, store, input),
        }
    }
}

/// The entry of `table` (one per kind, in [`StatementKind`]'s order) for `kind`.
pub fn by_kind<T: Copy>(kind: StatementKind, table: &[T; 13]) -> T {
    use StatementKind as K;
    let i = match kind {
        K::Select => 0,
        K::Insert => 1,
        K::Update => 2,
        K::Delete => 3,
        K::Merge => 4,
        K::Ddl => 5,
        K::Transaction => 6,
        K::Session => 7,
        K::Copy => 8,
        K::Call => 9,
        K::Explain => 10,
        K::Show => 11,
        K::Utility => 12,
    };
    table[i]
}
