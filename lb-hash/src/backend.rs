//! Backends as builders see them: a stable identity and a weight.
//!
//! The identity is what makes every load-balancer node agree: builders sort by it, and Maglev derives
//! each backend's permutation from it. Derive it from what all nodes know the same way, such as the
//! backend's address and port ([`BackendId::from_socket_addr`]), never from the order of a list.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, SocketAddr};

use crate::error::BuildError;
use crate::flow::{FlowHasher, KeyKind};

/// A backend's stable identity, the same on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub u64);

impl BackendId {
    /// The identity of the backend at `addr`.
    ///
    /// IPv4: `1 << 48 | address << 16 | port`, which is injective, so two IPv4 backends never share an
    /// identity. IPv6: the [`FlowHasher`] algorithm over the address words and port (kind tag 0x0B06,
    /// seed 0); distinct IPv6 backends collide with probability about 2^-64, and a collision is
    /// reported by builders as [`BuildError::DuplicateBackend`], never silently merged. Seed 0 is
    /// public, so addresses can still be crafted to collide (for example, one interface ID zeroes the
    /// hash state whatever the prefix); only whoever picks the backends' addresses can do that.
    #[must_use]
    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(ip) => Self(1 << 48 | u64::from(u32::from(ip)) << 16 | u64::from(addr.port())),
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                #[expect(clippy::cast_possible_truncation, reason = "splitting 128 bits into two words")]
                let words = [(bits >> 64) as u64, bits as u64, u64::from(addr.port())];
                Self(FlowHasher::new(0).words(KeyKind::BackendV6, &words))
            }
        }
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// One backend handed to a builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Stable identity; see [`BackendId`].
    pub id: BackendId,
    /// Relative share of new flows; 0 drains the backend (no new flows, index kept).
    pub weight: u32,
}

impl Backend {
    /// A backend with identity `id` and `weight`.
    #[must_use]
    pub const fn new(id: u64, weight: u32) -> Self {
        Self { id: BackendId(id), weight }
    }

    /// The backend at `addr` with `weight`, its identity from [`BackendId::from_socket_addr`].
    #[must_use]
    pub fn at(addr: SocketAddr, weight: u32) -> Self {
        Self { id: BackendId::from_socket_addr(addr), weight }
    }

    /// Whether the backend takes new flows.
    #[must_use]
    pub const fn is_serving(&self) -> bool {
        self.weight > 0
    }
}

/// Sorts `backends` by identity and checks the rules every builder shares: not empty, no duplicate
/// identity, at least one weight above 0.
pub(crate) fn sorted_backends(backends: &[Backend]) -> Result<Box<[Backend]>, BuildError> {
    if backends.is_empty() {
        return Err(BuildError::NoBackends);
    }
    let mut sorted: Vec<Backend> = backends.to_vec();
    sorted.sort_unstable_by_key(|b| b.id);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(BuildError::DuplicateBackend { id: pair[0].id });
    }
    if !sorted.iter().any(Backend::is_serving) {
        return Err(BuildError::AllWeightsZero { count: sorted.len() });
    }
    Ok(sorted.into_boxed_slice())
}

/// Position of `id` in a slice sorted by identity.
pub(crate) fn position_of(sorted: &[Backend], id: BackendId) -> Option<u32> {
    sorted.binary_search_by_key(&id, |b| b.id).ok().and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_identity_packs_address_and_port() {
        let id = BackendId::from_socket_addr(SocketAddr::new(Ipv4Addr::new(10, 0, 0, 7).into(), 80));
        assert_eq!(id, BackendId(0x0001_0a00_0007_0050));
    }

    #[test]
    fn ipv6_identity_depends_on_port_and_address() {
        let ip: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).into();
        let a = BackendId::from_socket_addr(SocketAddr::new(ip, 80));
        let b = BackendId::from_socket_addr(SocketAddr::new(ip, 81));
        let c = BackendId::from_socket_addr(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 80));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    /// Version 1 of the flow hash zeroed its state on a second pair word equal to its public constant
    /// K1, so IPv6 backends with that interface ID and one port shared an identity whatever their
    /// prefix, and such a configuration was refused as a duplicate.
    #[test]
    fn ipv6_identity_keeps_the_prefix_when_the_interface_id_is_the_hash_constant() {
        const K1: u128 = 0x1319_8a2e_0370_7344; // lb-hash's flow::K1
        let at = |prefix: u128| SocketAddr::new(Ipv6Addr::from(prefix << 64 | K1).into(), 8080);
        let backends: Vec<Backend> =
            [0x2001_0db8_0000_0001, 0x2001_0db8_0000_0002, 0xfd00_0000_0000_0000].map(|p| Backend::at(at(p), 1)).into();
        assert_ne!(backends[0].id, backends[1].id);
        assert_ne!(backends[0].id, backends[2].id);
        assert_ne!(backends[1].id, backends[2].id);
        assert!(sorted_backends(&backends).is_ok(), "distinct backends refused: {backends:?}");
    }

    #[test]
    fn shared_rules_reject_bad_sets() {
        assert_eq!(sorted_backends(&[]), Err(BuildError::NoBackends));
        assert_eq!(
            sorted_backends(&[Backend::new(3, 1), Backend::new(1, 1), Backend::new(3, 2)]),
            Err(BuildError::DuplicateBackend { id: BackendId(3) })
        );
        assert_eq!(
            sorted_backends(&[Backend::new(3, 0), Backend::new(1, 0)]),
            Err(BuildError::AllWeightsZero { count: 2 })
        );
        let sorted = sorted_backends(&[Backend::new(3, 0), Backend::new(1, 5)]).expect("valid set");
        assert_eq!(&*sorted, &[Backend::new(1, 5), Backend::new(3, 0)]);
        assert_eq!(position_of(&sorted, BackendId(3)), Some(1));
        assert_eq!(position_of(&sorted, BackendId(2)), None);
    }

    #[test]
    fn error_messages_name_the_value() {
        let msg = alloc::format!("{}", BuildError::DuplicateBackend { id: BackendId(0x2a) });
        assert!(msg.contains("0x000000000000002a"), "{msg}");
        let msg = alloc::format!("{}", BuildError::TableSizeNotPrime { size: 65536, next_prime: 65537 });
        assert!(msg.contains("65536") && msg.contains("65537"), "{msg}");
    }
}
