//! Route modules, laid out like the URLs under `/api/v1`.

pub mod auth;
pub mod broker_auth;
pub mod device_ingest;
pub mod devices;
pub mod firmware;
pub mod provisioning;
pub mod rollouts;
pub mod stream;
pub mod users;
