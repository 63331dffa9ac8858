//! The MQTT listeners' quotas on what one client or address may hold: subscriptions per
//! client, connections per principal (counted by [`super::CredentialWatch`]) and connections
//! per source address. Each refusal is counted in `stratus_limit_hits_total{limit}`.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

/// The quotas, and the connections counted per source address.
#[derive(Debug)]
pub struct Quotas {
    /// Subscriptions one client may hold (`[mqtt] max_subscriptions`).
    pub max_subscriptions: usize,
    /// Connections one device or application may hold at once.
    pub max_connections_per_principal: usize,
    /// Connections one IP address may hold at once.
    pub max_connections_per_address: usize,
    by_address: Mutex<HashMap<IpAddr, u32>>,
}

impl Quotas {
    /// Quotas with no connection counted yet.
    pub fn new(
        max_subscriptions: usize,
        max_connections_per_principal: usize,
        max_connections_per_address: usize,
    ) -> Quotas {
        Quotas {
            max_subscriptions,
            max_connections_per_principal,
            max_connections_per_address,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`; returns whether it is within the per-address quota
    /// (it is counted either way, and given back with [`address_closed`](Self::address_closed)).
    pub fn address_opened(&self, ip: IpAddr) -> bool {
        let mut map = self.by_address.lock();
        let n = map.entry(ip).or_insert(0);
        *n += 1;
        (*n as usize) <= self.max_connections_per_address
    }

    /// Gives back a connection from `ip`.
    pub fn address_closed(&self, ip: IpAddr) {
        let mut map = self.by_address.lock();
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas::new(usize::MAX, usize::MAX, usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_until_they_close() {
        let q = Quotas::new(10, 10, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(q.address_opened(a));
        assert!(q.address_opened(a));
        assert!(!q.address_opened(a), "the third from one address");
        assert!(q.address_opened(b), "another address is not affected");
        q.address_closed(a);
        q.address_closed(a);
        assert!(q.address_opened(a), "room again once one closed");
        q.address_closed(a);
        q.address_closed(a);
        q.address_closed(b);
        assert!(
            q.by_address.lock().is_empty(),
            "nothing kept for closed addresses"
        );
    }
}
