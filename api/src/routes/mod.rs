//! Route modules, laid out like the URLs under `/api/v1`.

pub mod auth;
pub mod devices;
pub mod users;
