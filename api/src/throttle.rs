//! Login throttling: at most a few attempts per minute per username *from one client address*,
//! and a few more per address over all usernames, so passwords cannot be guessed at speed.
//! The per-username limit is keyed by the address too, so a stranger who burns a username's
//! attempts from their address cannot lock its owner out: the owner, logging in from another
//! address, has attempts of their own. In memory, per process: behind a load balancer each API
//! process counts on its own, which still bounds guessing by the number of processes. The
//! address is the TCP peer's: behind a reverse proxy every client shares the proxy's.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Keys kept before forgetting the idle ones.
const MAX_KEYS: usize = 100_000;

/// Rate limits on login attempts.
pub struct LoginThrottle {
    per_user_and_address: DefaultKeyedRateLimiter<(String, Option<IpAddr>)>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
}

impl LoginThrottle {
    /// `per_user` attempts per minute per username and address, and `per_address` per address.
    pub fn new(per_user: u32, per_address: u32) -> Self {
        let per_minute =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_user_and_address: RateLimiter::keyed(per_minute(per_user)),
            per_address: RateLimiter::keyed(per_minute(per_address)),
        }
    }

    /// Counts an attempt for `user` (tenant and username) from `address`; 429 if either is
    /// over its limit.
    pub fn attempt(&self, user: &str, address: Option<IpAddr>) -> Result<(), ApiError> {
        // One IPv6 client usually holds a whole /64: it counts as one address.
        let address = address.map(|address| match address {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
            v4 => v4,
        });
        // Keys stay small whatever a client sends: a name longer than any valid one shares
        // one key with all such names.
        let user = if user.len() > 160 { "(too long)" } else { user };
        if self.per_user_and_address.len() > MAX_KEYS {
            self.per_user_and_address.retain_recent();
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
        self.per_user_and_address
            .check_key(&(user.to_lowercase(), address))
            .map_err(wait)?;
        Ok(())
    }
}

impl Default for LoginThrottle {
    /// 10 attempts a minute per username and address, 30 per address.
    fn default() -> Self {
        Self::new(10, 30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_64_counts_as_one_address_and_names_stay_bounded() {
        let throttle = LoginThrottle::new(100, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(throttle.attempt("acme/alice", Some(a)).is_ok());
        assert!(throttle.attempt("acme/bob", Some(b)).is_ok());
        assert!(throttle.attempt("acme/carol", Some(a)).is_err());
        assert!(throttle.attempt("acme/carol", Some(elsewhere)).is_ok());
        // Huge names share one key instead of growing the table.
        let throttle = LoginThrottle::new(1, 100);
        let long = |n: usize| format!("acme/{}", "x".repeat(200 + n));
        assert!(throttle.attempt(&long(1), None).is_ok());
        assert!(throttle.attempt(&long(2), None).is_err());
    }
}
