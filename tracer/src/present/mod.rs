//! What every view shares: units as people read them.

pub mod units;
