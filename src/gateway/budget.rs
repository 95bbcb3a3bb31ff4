//! Connection budgets: each listener (the HTTP API, the mesh) has its own, so that peers flooding
//! one cannot take the other's slots, and each caps the connections one peer address may hold.
//! A connection that does not fit is closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The open connections of one listener, in total and per peer address.
pub struct Budget {
    total: usize,
    per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// The listener's budget is spent.
    Total(usize),
    /// This address already holds its share.
    PerIp(usize),
}

/// Held for as long as its connection is open.
pub struct Slot {
    budget: Arc<Budget>,
    ip: IpAddr,
}

impl Budget {
    /// `per_ip` 0 means no cap per address.
    pub fn new(total: usize, per_ip: usize) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            per_ip,
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut open = self.lock();
        if open.total >= self.total {
            return Err(Full::Total(self.total));
        }
        let mine = open.by_ip.get(&ip).copied().unwrap_or(0);
        if self.per_ip > 0 && mine >= self.per_ip {
            return Err(Full::PerIp(self.per_ip));
        }
        open.total += 1;
        open.by_ip.insert(ip, mine + 1);
        Ok(Slot {
            budget: Arc::clone(self),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.budget.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "the listener's {n} connection slots are in use"),
            Full::PerIp(n) => write!(f, "this address already holds {n} connections"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_total_and_per_address_and_slots_come_back() {
        let b = Budget::new(3, 2);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let x1 = b.admit(x).unwrap();
        let _x2 = b.admit(x).unwrap();
        assert_eq!(b.admit(x).err(), Some(Full::PerIp(2)));
        let _y1 = b.admit(y).unwrap();
        assert_eq!(b.admit(y).err(), Some(Full::Total(3)));
        assert_eq!(b.open(), 3);
        drop(x1);
        assert_eq!(b.open(), 2);
        let _x3 = b.admit(x).unwrap();
        let unlimited = Budget::new(100, 0);
        let slots: Vec<Slot> = (0..100).map(|_| unlimited.admit(x).unwrap()).collect();
        assert_eq!(unlimited.admit(y).err(), Some(Full::Total(100)));
        drop(slots);
        assert_eq!(unlimited.open(), 0);
        assert!(
            unlimited.lock().by_ip.is_empty(),
            "no address is remembered"
        );
    }
}
