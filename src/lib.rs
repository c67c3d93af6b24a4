//! The `fleetlog` binary's library: its settings and the [`Platform`] builder that starts the
//! roles, shared by `main` and the end-to-end tests so that both run the same wiring.

pub mod metrics;
pub mod platform;
pub mod settings;

pub use platform::{ApiParts, Platform};
