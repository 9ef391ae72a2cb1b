//! The one interface every selector offers, and the enum the fast path holds.

use crate::backend::Backend;
use crate::ecmp::{EcmpHashThreshold, EcmpModulo};
use crate::jump::JumpHash;
use crate::maglev::MaglevTable;
use crate::rendezvous::Rendezvous;

/// Chooses a backend for a flow hash. Object-safe, so `Box<dyn Selector>` works; the fast path
/// prefers [`AnySelector`], which dispatches with a `match` instead of a virtual call.
pub trait Selector {
    /// The chosen backend as an index into the backends the selector was built from (sorted by
    /// identity; for [`JumpHash`], the bucket number). `None` only when no backend can take the flow.
    /// Never panics and never allocates.
    fn select(&self, hash: u64) -> Option<u32>;

    /// How many indices there are: `select` returns values below this.
    fn len(&self) -> usize;

    /// Whether there is no index at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Selector for MaglevTable {
    #[inline]
    fn select(&self, hash: u64) -> Option<u32> {
        self.lookup(hash)
    }

    fn len(&self) -> usize {
        self.backends().len()
    }
}

/// Any built-in selector, dispatched by `match` (no virtual call on the fast path).
#[derive(Debug, Clone, PartialEq)]
pub enum AnySelector {
    /// Weighted Maglev table.
    Maglev(MaglevTable),
    /// Weighted rendezvous (HRW).
    Rendezvous(Rendezvous),
    /// Jump consistent hash over numbered buckets.
    Jump(JumpHash),
    /// RFC 2992 hash-threshold ECMP.
    EcmpHashThreshold(EcmpHashThreshold),
    /// Modulo-N ECMP.
    EcmpModulo(EcmpModulo),
}

impl Selector for AnySelector {
    #[inline]
    fn select(&self, hash: u64) -> Option<u32> {
        match self {
            Self::Maglev(s) => s.lookup(hash),
            Self::Rendezvous(s) => s.lookup(hash),
            Self::Jump(s) => s.select(hash),
            Self::EcmpHashThreshold(s) => s.lookup(hash),
            Self::EcmpModulo(s) => s.lookup(hash),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Maglev(s) => Selector::len(s),
            Self::Rendezvous(s) => s.len(),
            Self::Jump(s) => s.len(),
            Self::EcmpHashThreshold(s) => s.len(),
            Self::EcmpModulo(s) => s.len(),
        }
    }
}

impl AnySelector {
    /// The backends `select` indexes into, sorted by identity; empty for [`JumpHash`], whose indices
    /// are the caller's bucket numbers.
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        match self {
            Self::Maglev(s) => s.backends(),
            Self::Rendezvous(s) => s.backends(),
            Self::Jump(_) => &[],
            Self::EcmpHashThreshold(s) => s.backends(),
            Self::EcmpModulo(s) => s.backends(),
        }
    }
}

macro_rules! from_selector {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for AnySelector {
            fn from(s: $ty) -> Self {
                Self::$variant(s)
            }
        }
    )*};
}
from_selector!(
    Maglev(MaglevTable),
    Rendezvous(Rendezvous),
    Jump(JumpHash),
    EcmpHashThreshold(EcmpHashThreshold),
    EcmpModulo(EcmpModulo)
);
