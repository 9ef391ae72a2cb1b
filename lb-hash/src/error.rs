//! The one error type of table building: every way a backend set or table size can be unusable.

use crate::backend::BackendId;

/// Why a selection table could not be built; the message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// No backends were given at all.
    #[error("the backend set is empty: give at least one backend")]
    NoBackends,
    /// Two backends carry the same identity, so their order (and the table) would be ambiguous.
    #[error("backend id {id} appears twice in the backend set")]
    DuplicateBackend {
        /// The repeated identity.
        id: BackendId,
    },
    /// Every backend has weight 0 (draining): nobody could take a new flow.
    #[error("all {count} backends have weight 0 (draining): at least one needs a weight above 0")]
    AllWeightsZero {
        /// How many backends were given.
        count: usize,
    },
    /// More backends than a table can index.
    #[error("{count} backends given, but a {selector} table holds at most {max}")]
    TooManyBackends {
        /// How many backends were given.
        count: usize,
        /// The limit of this selector.
        max: usize,
        /// Which selector refused.
        selector: &'static str,
    },
    /// The Maglev table size is not prime, so backends' permutations would not cover the table.
    #[error("Maglev table size {size} is not prime: use a prime such as {next_prime}")]
    TableSizeNotPrime {
        /// The size asked for.
        size: u32,
        /// The smallest prime above it, a usable size.
        next_prime: u32,
    },
    /// The Maglev table size cannot give every serving backend a slot.
    #[error(
        "Maglev table size {size} is too small for {backends} serving backends: use at least {min} \
         (a prime >= 100 x backends keeps balance within 1 %)"
    )]
    TableSizeTooSmall {
        /// The size asked for.
        size: u32,
        /// Backends with a weight above 0.
        backends: usize,
        /// The smallest prime size this crate suggests.
        min: u32,
    },
    /// The Maglev table size is beyond what this crate builds.
    #[error("Maglev table size {size} is above the limit of {max}")]
    TableSizeTooLarge {
        /// The size asked for.
        size: u32,
        /// The largest accepted size.
        max: u32,
    },
}
