//! Flow hashing and consistent backend selection. Filled in by issue 3.
#![no_std]
#![forbid(unsafe_code)]
