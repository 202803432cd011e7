//! Who may spend the host's password checks, and how fast.
//!
//! Online guessing is slowed per key and per source address, never for everyone at once:
//! - a request without a password to a protected party is answered `PasswordRequired` and
//!   counts for nothing;
//! - every key has [`PER_KEY`] wrong guesses per minute, every source address (IPv4, or IPv6
//!   /64) [`PER_SOURCE`]; only wrong guesses count, so after others' guessing the right
//!   password gets in at once. Sources are counted only after they proved they receive (the
//!   session layer delivers nothing else), so a spoofed flood cannot spend someone else's budget;
//! - the checks themselves (argon2id, tens of milliseconds each, see [`super::password`]) come
//!   from two pools per second: one for keys that were members of the party before (a
//!   restarted player, a returning friend) and one for strangers, so strangers alone cannot
//!   spend the share reserved for friends. An empty pool is not a refusal: the request is
//!   dropped and the joiner's next retry, a few hundred milliseconds later, gets in;
//! - password checks that the budgets allow run one at a time, off the control task
//!   ([`CheckQueue`]): one running, at most [`MAX_WAITING_CHECKS`] waiting; strangers hold at
//!   most `MAX_WAITING_CHECKS - FRIEND_SLOTS` places (the running one included), so a
//!   returning friend always finds one. A request that finds no room is dropped like one that
//!   finds an empty pool (not refused: the joiner retries), and is not charged.
//!   Rejoin tokens are cheap and are checked at once, with the same budgets.
//!
//! Every table is bounded. When the per-key table is full of other keys (a flood of fresh keys),
//! a new key is limited by its source alone instead of being refused: failing closed there would
//! lock every newcomer out.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lanrage_proto::ratelimit::{source_key, AttemptBudget, Charge, TokenBucket};

/// Wrong guesses per key per [`WINDOW`].
pub const PER_KEY: u32 = 5;
/// Wrong guesses per source address per [`WINDOW`].
pub const PER_SOURCE: u32 = 10;
/// The guessing window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Password checks per second for strangers, and for former members (each pool its own).
pub const CHECKS_PER_SEC: u64 = 20;
/// Keys and sources tracked at most (each entry is a few dozen bytes).
const MAX_TRACKED: usize = 4096;
/// Password checks waiting while one runs.
pub const MAX_WAITING_CHECKS: usize = 8;
/// Places (running or waiting) that strangers cannot take: a returning friend always finds one.
pub const FRIEND_SLOTS: usize = 2;
/// A check that has not reported back by then is given up (its request dropped), so a lost
/// result can never stop admissions.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the host may do with a join request that carries a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Check the password, then report the outcome with [`PasswordGuard::checked`].
    Check,
    /// This key or source has guessed wrong too often: refuse with `TooManyAttempts`.
    TooMany,
    /// No check capacity left this second: drop the request silently (the joiner retries).
    Busy,
}

/// Budgets for password checks on one host. Plain data; time passed in.
pub struct PasswordGuard {
    per_key: AttemptBudget<[u8; 32]>,
    per_source: AttemptBudget<IpAddr>,
    strangers: TokenBucket,
    friends: TokenBucket,
}

impl PasswordGuard {
    /// Fresh budgets.
    pub fn new(now: Instant) -> Self {
        PasswordGuard {
            per_key: AttemptBudget::new(PER_KEY, WINDOW, MAX_TRACKED),
            per_source: AttemptBudget::new(PER_SOURCE, WINDOW, MAX_TRACKED),
            strangers: TokenBucket::new(CHECKS_PER_SEC, CHECKS_PER_SEC, now),
            friends: TokenBucket::new(CHECKS_PER_SEC, CHECKS_PER_SEC, now),
        }
    }

    /// Before checking a password from `key` at `source`; `friend` when the key was a member of
    /// this party before. Charges the guess up front (refunded by [`PasswordGuard::checked`]
    /// when right), so attempts that arrive together are all counted.
    pub fn before_check(
        &mut self,
        key: &[u8; 32],
        source: IpAddr,
        friend: bool,
        now: Instant,
    ) -> Verdict {
        let source = budget_source(source);
        let key_charge = self.per_key.try_charge(key, now);
        if key_charge == Charge::Exhausted {
            return Verdict::TooMany;
        }
        if !self.per_source.charge(&source, now) {
            if key_charge == Charge::Charged {
                self.per_key.refund(key);
            }
            return Verdict::TooMany;
        }
        let pool = if friend {
            &mut self.friends
        } else {
            &mut self.strangers
        };
        if !pool.try_take(1, now) {
            if key_charge == Charge::Charged {
                self.per_key.refund(key);
            }
            self.per_source.refund(&source);
            return Verdict::Busy;
        }
        Verdict::Check
    }

    /// After a check allowed by [`PasswordGuard::before_check`]: a right password costs no
    /// guess.
    pub fn checked(&mut self, key: &[u8; 32], source: IpAddr, right: bool) {
        if right {
            self.per_key.refund(key);
            self.per_source.refund(&budget_source(source));
        }
    }

    /// A check allowed by [`PasswordGuard::before_check`] that never ran (the party changed, the
    /// check was lost): it costs nothing.
    pub fn release(&mut self, key: &[u8; 32], source: IpAddr, friend: bool) {
        self.per_key.refund(key);
        self.per_source.refund(&budget_source(source));
        if friend {
            self.friends.give_back(1);
        } else {
            self.strangers.give_back(1);
        }
    }

    /// Keys and sources tracked (for tests and status).
    pub fn tracked(&self) -> (usize, usize) {
        (self.per_key.len(), self.per_source.len())
    }
}

/// Password checks in order: at most one running (its ticket handed to the caller), a few
/// waiting. Plain data; the engine stores what it needs to answer the join in `T`.
pub struct CheckQueue<T> {
    running: Option<Queued<T>>,
    waiting: VecDeque<Queued<T>>,
    next_ticket: u64,
}

struct Queued<T> {
    key: [u8; 32],
    friend: bool,
    ticket: u64,
    started: Option<Instant>,
    item: T,
}

impl<T> Default for CheckQueue<T> {
    fn default() -> Self {
        CheckQueue {
            running: None,
            waiting: VecDeque::new(),
            next_ticket: 1,
        }
    }
}

impl<T> CheckQueue<T> {
    /// Whether a check for `key` is running or waiting (a retransmitted request waits for it).
    pub fn has(&self, key: &[u8; 32]) -> bool {
        self.iter().any(|q| q.key == *key)
    }

    /// Whether a check for a friend (or a stranger) would find a place.
    pub fn room(&self, friend: bool) -> bool {
        if self.waiting.len() >= MAX_WAITING_CHECKS {
            return false;
        }
        friend || self.iter().filter(|q| !q.friend).count() < MAX_WAITING_CHECKS - FRIEND_SLOTS
    }

    /// Queues a check; callers ask [`CheckQueue::room`] first (without room it is dropped).
    pub fn push(&mut self, key: [u8; 32], friend: bool, item: T) {
        if self.waiting.len() < MAX_WAITING_CHECKS {
            self.waiting.push_back(Queued {
                key,
                friend,
                ticket: 0,
                started: None,
                item,
            });
        }
    }

    /// If nothing runs, starts the next waiting check: its ticket and item.
    pub fn start_next(&mut self, now: Instant) -> Option<(u64, &T)> {
        if self.running.is_some() {
            return None;
        }
        let mut q = self.waiting.pop_front()?;
        q.ticket = self.next_ticket;
        q.started = Some(now);
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        let q = self.running.insert(q);
        Some((q.ticket, &q.item))
    }

    /// The running check with this ticket, done: its key's friend flag and item. `None` for a
    /// ticket that is not running (late, repeated or made up).
    pub fn finish(&mut self, ticket: u64) -> Option<(bool, T)> {
        if self.running.as_ref().is_some_and(|q| q.ticket == ticket) {
            return self.running.take().map(|q| (q.friend, q.item));
        }
        None
    }

    /// The running check, given up if it has run for [`CHECK_TIMEOUT`].
    pub fn expire(&mut self, now: Instant) -> Option<(bool, T)> {
        let started = self.running.as_ref()?.started?;
        if now.saturating_duration_since(started) < CHECK_TIMEOUT {
            return None;
        }
        self.running.take().map(|q| (q.friend, q.item))
    }

    /// Removes the waiting checks `keep` says no to, returning them.
    pub fn drop_waiting(&mut self, mut keep: impl FnMut(&T) -> bool) -> Vec<(bool, T)> {
        let (kept, dropped): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|q| keep(&q.item));
        self.waiting = kept.into();
        dropped.into_iter().map(|q| (q.friend, q.item)).collect()
    }

    /// Checks running or waiting.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether nothing runs or waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn iter(&self) -> impl Iterator<Item = &Queued<T>> {
        self.running.iter().chain(self.waiting.iter())
    }
}

/// The per-source budget's key: an IPv4 address or IPv6 /64, except a relayed joiner's relay
/// session with us (all of them share one /64, `crate::path::vaddr`), counted on its own.
fn budget_source(source: IpAddr) -> IpAddr {
    if crate::path::vaddr::is_virtual(&std::net::SocketAddr::new(source, 0)) {
        source
    } else {
        source_key(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_joiners_do_not_share_one_source_budget() {
        use lanrage_proto::ids::SessionId;
        let a = crate::path::vaddr::vaddr(SessionId(1)).ip();
        let b = crate::path::vaddr::vaddr(SessionId(2)).ip();
        assert_ne!(budget_source(a), budget_source(b));
        let x: IpAddr = "2001:db8::1".parse().unwrap();
        let y: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(budget_source(x), budget_source(y));
    }
    use std::net::Ipv4Addr;

    fn src(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc000_0200 + n))
    }

    fn key(n: u32) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        k
    }

    #[test]
    fn a_key_is_limited_and_others_are_not() {
        let now = Instant::now();
        let mut g = PasswordGuard::new(now);
        for _ in 0..PER_KEY {
            assert_eq!(g.before_check(&key(1), src(1), false, now), Verdict::Check);
            g.checked(&key(1), src(1), false);
        }
        assert_eq!(
            g.before_check(&key(1), src(2), false, now),
            Verdict::TooMany
        );
        // Another key at another address is untouched.
        assert_eq!(g.before_check(&key(2), src(3), false, now), Verdict::Check);
        // After the window, the first key may try again.
        let later = now + WINDOW + Duration::from_secs(1);
        assert_eq!(
            g.before_check(&key(1), src(1), false, later),
            Verdict::Check
        );
    }

    #[test]
    fn a_source_cycling_keys_is_limited_by_its_address() {
        let now = Instant::now();
        let mut g = PasswordGuard::new(now);
        let mut checks = 0;
        for n in 0..100 {
            if g.before_check(&key(n), src(1), false, now) == Verdict::Check {
                checks += 1;
                g.checked(&key(n), src(1), false);
            }
        }
        assert_eq!(checks, PER_SOURCE);
        // The right password from elsewhere goes straight in.
        assert_eq!(
            g.before_check(&key(500), src(2), false, now),
            Verdict::Check
        );
    }

    #[test]
    fn right_passwords_cost_no_guess() {
        let now = Instant::now();
        let mut g = PasswordGuard::new(now);
        for i in 0..(PER_KEY * 3) {
            let t = now + Duration::from_millis(100 * u64::from(i));
            assert_eq!(g.before_check(&key(1), src(1), true, t), Verdict::Check);
            g.checked(&key(1), src(1), true);
        }
    }

    #[test]
    fn strangers_cannot_spend_the_friends_share() {
        let now = Instant::now();
        let mut g = PasswordGuard::new(now);
        let mut busy = 0;
        for n in 0..1000 {
            match g.before_check(&key(n), src(n), false, now) {
                Verdict::Check => g.checked(&key(n), src(n), false),
                Verdict::Busy => busy += 1,
                Verdict::TooMany => {}
            }
        }
        assert!(busy > 900, "the strangers' pool ran dry: {busy}");
        assert_eq!(
            g.before_check(&key(5000), src(5000), true, now),
            Verdict::Check
        );
    }

    #[test]
    fn tables_stay_bounded_and_newcomers_are_not_locked_out() {
        let mut now = Instant::now();
        let mut g = PasswordGuard::new(now);
        // A million fresh keys from a thousand addresses, over a while.
        for n in 0..1_000_000u32 {
            if n % 1000 == 0 {
                now += Duration::from_millis(50);
            }
            if g.before_check(&key(n), src(n % 1000), false, now) == Verdict::Check {
                g.checked(&key(n), src(n % 1000), false);
            }
        }
        let (keys, sources) = g.tracked();
        assert!(keys <= MAX_TRACKED && sources <= MAX_TRACKED);
        // A newcomer at a fresh address still gets its check (after the pool refills).
        now += Duration::from_secs(1);
        assert_eq!(
            g.before_check(&key(2_000_000), src(9999), false, now),
            Verdict::Check
        );
    }

    #[test]
    fn checks_run_one_at_a_time_and_the_queue_is_bounded() {
        let now = Instant::now();
        let mut q = CheckQueue::default();
        for n in 0..20u32 {
            if q.room(false) {
                q.push(key(n), false, n);
            }
        }
        assert_eq!(
            q.len(),
            MAX_WAITING_CHECKS - FRIEND_SLOTS,
            "strangers leave room"
        );
        assert!(q.room(true));
        q.push(key(100), true, 100);
        let (t1, first) = q.start_next(now).unwrap();
        assert_eq!(*first, 0);
        assert!(q.start_next(now).is_none(), "one at a time");
        assert!(
            q.finish(t1 + 1).is_none(),
            "a wrong ticket finishes nothing"
        );
        assert_eq!(q.finish(t1), Some((false, 0)));
        assert!(q.finish(t1).is_none(), "nor a repeated one");
        let (t2, second) = q.start_next(now).unwrap();
        assert_eq!(*second, 1);
        assert_ne!(t1, t2);
        assert!(q.has(&key(1)) && q.has(&key(100)) && !q.has(&key(0)));
        // A lost result is given up after the timeout, and the next check starts.
        assert!(q.expire(now + CHECK_TIMEOUT / 2).is_none());
        assert_eq!(q.expire(now + CHECK_TIMEOUT), Some((false, 1)));
        assert!(q.start_next(now).is_some());
        let dropped = q.drop_waiting(|n| *n != 100);
        assert_eq!(dropped, vec![(true, 100)]);
    }

    #[test]
    fn a_released_check_costs_nothing() {
        let now = Instant::now();
        let mut g = PasswordGuard::new(now);
        for _ in 0..(PER_KEY * 4) {
            assert_eq!(g.before_check(&key(1), src(1), false, now), Verdict::Check);
            g.release(&key(1), src(1), false);
        }
    }
}
