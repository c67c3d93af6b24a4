//! Login throttling: at most a few attempts per minute per username and per client address,
//! so passwords cannot be guessed at speed. In memory, per process: behind a load balancer each
//! API process counts on its own, which still bounds guessing by the number of processes.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Keys kept before forgetting the idle ones.
const MAX_KEYS: usize = 100_000;

/// Rate limits on login attempts.
pub struct LoginThrottle {
    per_user: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
}

impl LoginThrottle {
    /// `per_user` and `per_address` attempts per minute.
    pub fn new(per_user: u32, per_address: u32) -> Self {
        let per_minute =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_user: RateLimiter::keyed(per_minute(per_user)),
            per_address: RateLimiter::keyed(per_minute(per_address)),
        }
    }

    /// Counts an attempt for `user` (tenant and username) from `address`; 429 if either is
    /// over its limit.
    pub fn attempt(&self, user: &str, address: Option<IpAddr>) -> Result<(), ApiError> {
        if self.per_user.len() > MAX_KEYS {
            self.per_user.retain_recent();
        }
        if self.per_address.len() > MAX_KEYS {
            self.per_address.retain_recent();
        }
        let now = DefaultClock::default().now();
        let wait = |denied: governor::NotUntil<_>| ApiError::TooManyRequests {
            retry_after: denied.wait_time_from(now).as_secs().max(1),
        };
        if let Some(address) = address {
            self.per_address.check_key(&address).map_err(wait)?;
        }
        self.per_user
            .check_key(&user.to_lowercase())
            .map_err(wait)?;
        Ok(())
    }
}

impl Default for LoginThrottle {
    /// 10 attempts a minute per username, 30 per address.
    fn default() -> Self {
        Self::new(10, 30)
    }
}
