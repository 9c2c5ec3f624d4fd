//! The lease of a durable consumer in Redis (see [`crate::transport::InstanceOrder`]): the key
//! `{key_prefix}ampy:lease:{consumer in URL-safe base64}` holds the holder's token with a
//! `PX` expiry of the lease time, and `…:last` (no expiry) records `held:{expiry ms}:{token}`
//! or `free`, so a successor can tell a clean release from a lease that ran out or was
//! removed while held. Every step is one Lua script (atomic; times from the server's `TIME`).

use super::Shared;
use crate::error::Result;
use crate::transport::lease::{LeaseStore, Previous};
use async_trait::async_trait;
use base64::Engine as _;
use std::sync::Arc;
use std::time::Duration;

/// KEYS: lease, last. ARGV: token, ttl ms. Returns {state, wait ms}.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'held', 0} end
local last = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('SET', KEYS[2], 'held:' .. (now + ttl) .. ':' .. ARGV[1])
if cur then return {'mine', 0} end
if not last or last == 'free' then return {'clean', 0} end
local exp, who = string.match(last, '^held:(%d+):(.*)$')
if who == ARGV[1] then return {'mine', 0} end
exp = tonumber(exp) or 0
if exp <= now then return {'lapsed', 0} end
return {'removed', exp - now}
"#;

/// KEYS: lease, last. ARGV: token, ttl ms. Returns 1 when renewed.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], 'held:' .. (now + tonumber(ARGV[2])) .. ':' .. ARGV[1])
return 1
"#;

/// KEYS: lease, last. ARGV: token. Returns 1 when released.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], 'free')
return 1
"#;

pub(crate) struct RedisLease {
    shared: Arc<Shared>,
    key: String,
    last: String,
}

impl RedisLease {
    pub(crate) fn new(shared: &Arc<Shared>, consumer: &str) -> RedisLease {
        let key = format!(
            "{}ampy:lease:{}",
            shared.opts.key_prefix,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(consumer.as_bytes())
        );
        RedisLease {
            shared: shared.clone(),
            last: format!("{key}:last"),
            key,
        }
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
    ) -> Result<T> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(2).arg(&self.key).arg(&self.last);
        for a in args {
            cmd.arg(*a);
        }
        self.shared
            .query(&format!("consumer lease {}: {what}", self.key), &cmd)
            .await
    }
}

#[async_trait]
impl LeaseStore for RedisLease {
    async fn acquire(&self, token: &str, ttl: Duration) -> Result<Option<Previous>> {
        let ms = ttl.as_millis().to_string();
        let (state, wait): (String, u64) = self.eval("taking", ACQUIRE, &[token, &ms]).await?;
        Ok(match state.as_str() {
            "held" => None,
            "mine" => Some(Previous::Mine),
            "clean" => Some(Previous::Clean),
            "lapsed" => Some(Previous::Lapsed),
            _ => Some(Previous::Removed(Duration::from_millis(wait))),
        })
    }

    async fn renew(&self, token: &str, ttl: Duration) -> Result<bool> {
        let ms = ttl.as_millis().to_string();
        let n: i64 = self.eval("renewing", RENEW, &[token, &ms]).await?;
        Ok(n == 1)
    }

    async fn release(&self, token: &str) -> Result<()> {
        let _: i64 = self.eval("releasing", RELEASE, &[token]).await?;
        Ok(())
    }
}
