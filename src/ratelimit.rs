//! A token bucket: `rate` tokens a second on average, up to `burst` at once. Used for the
//! API keys' request rate and the integration agent's call rate.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket, safe to share.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_second: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate_per_second.max(1e-9),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("token bucket lock");
        let now = Instant::now();
        let tokens =
            (state.0 + now.duration_since(state.1).as_secs_f64() * self.rate).min(self.burst);
        *state = (tokens, now);
        if tokens >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Waits for a token, at most `limit`; false when none came in time.
    pub async fn take_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.try_take() {
                Ok(()) => return true,
                Err(wait) if Instant::now() + wait > deadline => return false,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            assert!(bucket.try_take().is_ok());
        }
        let wait = bucket.try_take().unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(bucket.try_take().is_ok());
    }
}
