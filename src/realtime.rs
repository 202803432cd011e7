//! Real-time priority for the threads that move packets, with a guard so they never starve the
//! machine.
//!
//! Why: on a busy machine (a download filling the tunnel while a game runs) every packet crosses
//! several threads (the kernel's, this daemon's, the peer's), and under the normal scheduler each
//! waits for a CPU slice behind whatever else is runnable. Measured in the two-namespace lab with
//! both cores saturated by a TCP download: a ping's round trip averaged 6.3 ms (p99 15.9 ms) with
//! the daemons at normal priority and 0.7 ms (p99 2.9 ms) with their async workers at `SCHED_RR`,
//! at the same throughput and the same CPU use (BENCHMARKS.md). Kernel WireGuard gets the same
//! effect by running in softirq context.
//!
//! Real-time only while the CPUs the daemon may use are busy ([`MachineLoad`]): on an idle
//! machine there is no queue for a CPU to skip, and a real-time wake-up is placed on another
//! CPU more often, which cost idle pings about 40 us in the lab.
//!
//! The price of a real-time thread is that it runs before every normal one: a thread stuck at
//! 100% (a flood, a bug) would take a core from the game. So a watchdog samples each enrolled
//! thread's CPU time and hands a thread that stays busy ([`BusyGuard`]) back to the normal
//! scheduler until it calms down: bulk work then competes fairly, as it did before.
//!
//! Only tokio's *worker* threads are enrolled (the runtime's park hook runs on workers only):
//! the blocking pool, where password hashing and file writes run, stays at normal priority.
//! Needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least [`WATCHDOG_PRIORITY`] (the systemd
//! unit sets `LimitRTPRIO`); without either the daemon runs at normal priority and says so once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

/// `SCHED_RR` priority of the enrolled workers: the lowest band, below the kernel's own
/// real-time threads (threaded interrupts run at 50), so only normal programs wait for them.
pub const WORKER_PRIORITY: i32 = 5;
/// The watchdog runs just above the workers so a busy worker cannot keep it from acting.
pub const WATCHDOG_PRIORITY: i32 = WORKER_PRIORITY + 1;
/// How often the watchdog samples the workers' CPU time.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The window over which CPU use is judged.
pub const WINDOW: Duration = Duration::from_secs(1);
/// A real-time worker busier than this (of one core) over [`WINDOW`] goes back to the normal
/// scheduler.
pub const THREAD_DEMOTE_ABOVE: f64 = 0.80;
/// A demoted one gets its priority back once its CPU use is below its limit and its small
/// packets below this fraction of theirs over [`WINDOW`]... (CPU has no band of its own: a
/// download that stays just under the limit, as it does in the lab, must get real-time back
/// after a flood.)
pub const PROMOTE_SMALL_FRACTION: f64 = 0.5;
/// ...and at least this long after it was demoted (no flapping around the threshold).
pub const HOLD: Duration = Duration::from_secs(3);

/// How many cores the enrolled workers may use together and stay real-time: all but one (at
/// least half a core), so normal programs always keep a core's worth even when the busy work
/// moves between workers (tokio migrates tasks, so one thread's share alone can hide it).
pub fn process_budget(cpus: usize) -> f64 {
    (cpus as f64 - 1.0).max(0.5)
}

/// Packets below this size (bytes of IP packet) count as small: games' and pings' packets, ACKs.
pub const SMALL_PACKET: usize = 256;

/// Small packets per second (both ways, all peers) above which the workers go back to the
/// normal scheduler. Real-time pays off for threads that sleep and wake for a little work: a
/// game's packets (a 64-player server at 128 Hz moves 16 thousand a second), a download's
/// bursts and ACKs (a few thousand). A flood of small packets wakes a real-time thread for each
/// one, and preempting the program that sends them costs more than it saves: batching, which
/// needs the thread to wait its turn, moved twice the packets in bench.sh (BENCHMARKS.md).
/// Counted in packets, not in wake-ups, because those depend on the priority itself.
pub const PROCESS_SMALL_ABOVE: f64 = 20_000.0;

/// Which way a packet went through the datapath.
#[derive(Debug, Clone, Copy)]
pub enum Way {
    /// From the party device out to a peer.
    Sent = 0,
    /// From a peer in to the party device.
    Received = 1,
}

/// Small packets moved so far ([`note_packet`]), one count per [`Way`], each on a cache line of
/// its own: the two ways run on two cores, per packet.
static SMALL_PACKETS: [CachePadded<AtomicU64>; 2] = [
    CachePadded::new(AtomicU64::new(0)),
    CachePadded::new(AtomicU64::new(0)),
];

/// Counts a packet the datapath moved (`len`: its IP length) for the guard's flood rule.
#[inline]
pub fn note_packet(way: Way, len: usize) {
    if is_small(len) {
        SMALL_PACKETS[way as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether an IP packet of `len` bytes counts for the flood rule.
fn is_small(len: usize) -> bool {
    len < SMALL_PACKET
}

/// Small packets moved so far, both ways.
fn small_packets() -> u64 {
    SMALL_PACKETS
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// Adds a sample taken at `now`, keeping one at or before the start of the [`WINDOW`] that ends
/// now (so a window is always full width once there is one) and none older.
fn push_sample<T>(samples: &mut VecDeque<(Instant, T)>, now: Instant, sample: T) {
    samples.push_back((now, sample));
    while samples.len() > 2
        && samples
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= WINDOW)
    {
        samples.pop_front();
    }
}

/// What the guard decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Back to the normal scheduler: bulk work.
    Demote,
    /// Real-time again: mostly waiting for packets.
    Promote,
}

/// What a thread (or all workers) had used in all at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, in ns (`schedstat`).
    pub cpu_ns: u64,
    /// Small packets moved ([`note_packet`]; all workers together only).
    pub small: u64,
}

/// Whether something (a thread, or all workers together) may stay real-time, from samples of
/// its [`Usage`]. Pure: time and usage are arguments.
#[derive(Debug)]
pub struct BusyGuard {
    /// Cores of CPU use over [`WINDOW`] above which it is demoted.
    cpu_above: f64,
    /// Small packets per second over [`WINDOW`] above which it is demoted.
    small_above: f64,
    /// (when, usage so far), oldest first, spanning at most a little over [`WINDOW`].
    samples: VecDeque<(Instant, Usage)>,
    realtime: bool,
    demoted_at: Option<Instant>,
    /// CPU demotions in a row, each within [`STRIKES_FOR`] of the one before: each doubles the hold.
    strikes: u32,
}

/// A demotion within this long of the previous one counts as a repeat ([`BusyGuard`]): work
/// that is bulk at real-time but fits under the limit at normal priority would otherwise flap.
pub const STRIKES_FOR: Duration = Duration::from_secs(60);
/// The hold never grows past [`HOLD`] times 2 to this power (48 s).
pub const MAX_STRIKES: u32 = 4;

impl BusyGuard {
    /// A guard for one worker thread ([`THREAD_DEMOTE_ABOVE`]).
    pub fn thread() -> Self {
        Self::with(THREAD_DEMOTE_ABOVE, f64::INFINITY)
    }

    /// A guard for all workers together on a machine with `cpus` cores ([`process_budget`],
    /// [`PROCESS_SMALL_ABOVE`]).
    pub fn process(cpus: usize) -> Self {
        Self::with(process_budget(cpus), PROCESS_SMALL_ABOVE)
    }

    fn with(cpu_above: f64, small_above: f64) -> Self {
        BusyGuard {
            cpu_above,
            small_above,
            samples: VecDeque::new(),
            realtime: true,
            demoted_at: None,
            strikes: 0,
        }
    }

    /// How long a demotion holds now: [`HOLD`], doubled for each repeat.
    pub fn hold(&self) -> Duration {
        HOLD * 2u32.pow(self.strikes.min(MAX_STRIKES))
    }

    /// Whether it may be real-time by the guard's last decision.
    pub fn is_realtime(&self) -> bool {
        self.realtime
    }

    /// One sample: the usage so far at `now`. A demoted one is promoted again once its CPU use
    /// is below its limit and its small packets below [`PROMOTE_SMALL_FRACTION`] of theirs, at
    /// least [`HOLD`] after the demotion.
    pub fn observe(&mut self, now: Instant, usage: Usage) -> Option<Change> {
        push_sample(&mut self.samples, now, usage);
        let &(first_at, first) = self.samples.front()?;
        let span = now.duration_since(first_at);
        // Judge only a full window: a short burst at start-up is not "busy".
        if span < WINDOW {
            return None;
        }
        let secs = span.as_secs_f64();
        let cores = usage.cpu_ns.saturating_sub(first.cpu_ns) as f64 / 1e9 / secs;
        let small = usage.small.saturating_sub(first.small) as f64 / secs;
        if self.realtime && (cores > self.cpu_above || small > self.small_above) {
            // Only CPU flaps: it is lower at normal priority than at real-time. Small packets
            // are counted the same at either, so a flood stays demoted without help.
            let repeat = cores > self.cpu_above
                && self
                    .demoted_at
                    .is_some_and(|at| now.duration_since(at) < STRIKES_FOR);
            self.strikes = if repeat {
                (self.strikes + 1).min(MAX_STRIKES)
            } else {
                0
            };
            self.realtime = false;
            self.demoted_at = Some(now);
            return Some(Change::Demote);
        }
        let held = self
            .demoted_at
            .is_none_or(|at| now.duration_since(at) >= self.hold());
        let calm = cores < self.cpu_above && small < self.small_above * PROMOTE_SMALL_FRACTION;
        if !self.realtime && held && calm {
            // demoted_at stays: a demotion soon after this one is a repeat.
            self.realtime = true;
            return Some(Change::Promote);
        }
        None
    }
}

/// CPU time of the CPUs the daemon may run on, from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user, nice, system, irq, softirq and steal.
    pub busy: u64,
    /// `busy` plus idle and iowait.
    pub total: u64,
}

/// The machine counts as busy once its CPUs were busy more than this over [`BUSY_WINDOW`]...
pub const BUSY_ABOVE: f64 = 0.85;
/// ...a short window, so real-time starts within a few hundred milliseconds of a download.
pub const BUSY_WINDOW: Duration = Duration::from_millis(300);
/// It is calm again below this over [`WINDOW`].
pub const CALM_BELOW: f64 = 0.6;

/// Whether the CPUs the daemon may use are busy, from samples of [`CpuTimes`]: only then does
/// a packet wait for a CPU behind other programs, so only then is real-time worth it. Measured
/// on the whole machine (every program's use), so it does not change when our own threads
/// change priority. Pure: time and CPU times are arguments.
#[derive(Debug, Default)]
pub struct MachineLoad {
    samples: VecDeque<(Instant, CpuTimes)>,
    busy: bool,
    /// When it became busy: calm is judged only over a window that is all after it.
    busy_since: Option<Instant>,
}

impl MachineLoad {
    /// No sample to be had: busy from `now` (calm again once samples show it).
    pub fn assume_busy(&mut self, now: Instant) {
        if !self.busy {
            self.busy = true;
            self.busy_since = Some(now);
        }
    }

    /// Whether the machine is busy by the last sample.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// One sample: `times` so far at `now`.
    pub fn observe(&mut self, now: Instant, times: CpuTimes) {
        push_sample(&mut self.samples, now, times);
        // The busy fraction since the newest sample at least `over` old.
        let since = |over: Duration| {
            let &(_, then) = self
                .samples
                .iter()
                .rev()
                .find(|(at, _)| now.duration_since(*at) >= over)?;
            let total = times.total.saturating_sub(then.total);
            (total > 0).then(|| times.busy.saturating_sub(then.busy) as f64 / total as f64)
        };
        let busy_for = self.busy_since.map(|at| now.duration_since(at));
        if !self.busy {
            if since(BUSY_WINDOW).is_some_and(|f| f > BUSY_ABOVE) {
                self.busy = true;
                self.busy_since = Some(now);
            }
        } else if busy_for.is_some_and(|d| d >= WINDOW)
            && since(WINDOW).is_some_and(|f| f < CALM_BELOW)
        {
            self.busy = false;
            self.busy_since = None;
        }
    }
}

/// What the status shows about real-time scheduling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealtimeStats {
    /// Worker threads enrolled (real-time whenever the machine is busy and they are not bulk).
    pub enrolled: u64,
    /// Worker threads running real-time now.
    pub threads: u64,
    /// Times a busy worker was handed back to the normal scheduler.
    pub demotions: u64,
    /// Whether the kernel refused real-time priority (no `CAP_SYS_NICE`, no `RLIMIT_RTPRIO`).
    pub refused: bool,
}

/// The enrolled workers (thread ids) and the counters: one per process, because the runtime's
/// hook has no place to keep state of its own.
struct Registry {
    tids: Mutex<Vec<libc::pid_t>>,
    enrolled: AtomicU64,
    threads: AtomicU64,
    demotions: AtomicU64,
    refused: AtomicBool,
    watchdog: Once,
}

static REGISTRY: Registry = Registry {
    tids: Mutex::new(Vec::new()),
    enrolled: AtomicU64::new(0),
    threads: AtomicU64::new(0),
    demotions: AtomicU64::new(0),
    refused: AtomicBool::new(false),
    watchdog: Once::new(),
};

thread_local! {
    static ENROLLED: Cell<bool> = const { Cell::new(false) };
}

/// Hands the calling thread to the watchdog, which makes it real-time while the machine is busy
/// (once per thread; later calls cost a thread-local read). Meant for tokio's `on_thread_park`
/// hook, which runs on the runtime's workers only.
pub fn enroll_current_worker() {
    if ENROLLED.with(|e| e.replace(true)) {
        return;
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // Whether the kernel allows it at all (both ways), found out now, for the log and
    // `lanrage doctor`.
    let allowed = set_policy(tid, true).and_then(|()| set_policy(tid, false));
    if allowed.is_err() {
        let _ = set_policy(tid, false); // never leave it real-time unwatched
    }
    match allowed {
        Ok(()) => {
            REGISTRY.enrolled.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut tids) = REGISTRY.tids.lock() {
                tids.push(tid);
            }
            REGISTRY.watchdog.call_once(start_watchdog);
        }
        Err(e) => {
            if !REGISTRY.refused.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    error = %e,
                    "packets are moved at normal priority (real-time needs CAP_SYS_NICE or \
                     RLIMIT_RTPRIO); a game's packets may wait longer while the machine is busy"
                );
            }
        }
    }
}

/// The counters for the status.
pub fn stats() -> RealtimeStats {
    RealtimeStats {
        enrolled: REGISTRY.enrolled.load(Ordering::Relaxed),
        threads: REGISTRY.threads.load(Ordering::Relaxed),
        demotions: REGISTRY.demotions.load(Ordering::Relaxed),
        refused: REGISTRY.refused.load(Ordering::Relaxed),
    }
}

/// `SCHED_RR` at [`WORKER_PRIORITY`] (`realtime`) or back to `SCHED_OTHER`, for one thread.
fn set_policy(tid: libc::pid_t, realtime: bool) -> std::io::Result<()> {
    let (policy, priority) = if realtime {
        // Threads this one starts (tokio's blocking pool grows from its workers) must not
        // inherit real-time: they run password hashing and file writes.
        (libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, WORKER_PRIORITY)
    } else {
        // Keeping the flag: clearing it takes CAP_SYS_NICE, which the systemd unit does not
        // grant (it allows real-time through RLIMIT_RTPRIO alone), so a plain SCHED_OTHER would
        // be refused and leave the thread real-time.
        (libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, 0)
    };
    set_scheduler(tid, policy, priority)
}

fn set_scheduler(tid: libc::pid_t, policy: libc::c_int, priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the duration of the call; on Linux a thread
    // id names that one thread.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`CpuTimes`] of the CPUs in `cpus` (all when empty), from `/proc/stat`.
fn cpu_times(cpus: &[usize]) -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let mut sum = CpuTimes::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else {
            continue; // the "cpu" line (all CPUs together) or not a CPU line
        };
        if !cpus.is_empty() && !cpus.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq + steal;
        sum.busy += busy;
        sum.total += busy + idle + iowait;
    }
    (sum.total > 0).then_some(sum)
}

/// The CPUs this process may run on (empty: unknown, count them all).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// CPU time `tid` (a thread of this process) has used, in ns, from
/// `/proc/self/task/T/schedstat`.
fn cpu_ns(tid: libc::pid_t) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The watchdog: a thread of its own at [`WATCHDOG_PRIORITY`] (it sleeps nearly all the time).
/// It is the only one that makes workers real-time, so if it cannot run above them, or fails,
/// none is.
fn start_watchdog() {
    let spawned = std::thread::Builder::new()
        .name("lanrage-rt-guard".into())
        .spawn(|| {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            let policy = libc::SCHED_RR | libc::SCHED_RESET_ON_FORK;
            if let Err(e) = set_scheduler(me, policy, WATCHDOG_PRIORITY) {
                // Below the workers it could not act on them when they are busy.
                refuse("the watchdog cannot run above the packet threads", &e);
                return;
            }
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut watchdog = Watchdog {
                threads: Vec::new(),
                all: BusyGuard::process(cpus),
                total_ns: 0,
                load: MachineLoad::default(),
                cpus: allowed_cpus(),
            };
            loop {
                std::thread::sleep(SAMPLE_EVERY);
                let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    watchdog.round(Instant::now())
                }));
                if round.is_err() {
                    tracing::warn!(
                        "the real-time watchdog failed; packets move at normal priority"
                    );
                    demote_all();
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        refuse("cannot start the real-time watchdog", &e);
    }
}

/// No real-time from now on: says why once, for the log and `lanrage doctor`.
fn refuse(why: &str, e: &std::io::Error) {
    demote_all();
    if !REGISTRY.refused.swap(true, Ordering::Relaxed) {
        tracing::info!(error = %e, "{why}; packets are moved at normal priority");
    }
}

/// Every enrolled worker back to normal priority, for good.
fn demote_all() {
    let tids = REGISTRY.tids.lock().unwrap_or_else(|e| e.into_inner());
    for &tid in tids.iter() {
        let _ = set_policy(tid, false);
    }
    REGISTRY.threads.store(0, Ordering::Relaxed);
}

/// One enrolled worker as the watchdog sees it.
struct Watched {
    tid: libc::pid_t,
    guard: BusyGuard,
    /// CPU time at the last sample (for the process total).
    last_ns: u64,
    /// Whether it runs real-time now (what was last applied).
    realtime: bool,
}

/// The watchdog's state: a guard per worker and one for all of them together.
struct Watchdog {
    threads: Vec<Watched>,
    all: BusyGuard,
    /// Whether the machine is busy (real-time only then).
    load: MachineLoad,
    /// The CPUs the daemon may run on (what "the machine" is for [`MachineLoad`]).
    cpus: Vec<usize>,
    /// CPU time of all workers, summed from each one's increments (a thread that ends takes
    /// nothing back).
    total_ns: u64,
}

impl Watchdog {
    /// One round over every enrolled worker.
    fn round(&mut self, now: Instant) {
        let tids: Vec<libc::pid_t> = REGISTRY
            .tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for tid in tids {
            if !self.threads.iter().any(|w| w.tid == tid) {
                let last_ns = cpu_ns(tid).unwrap_or(0);
                self.threads.push(Watched {
                    tid,
                    guard: BusyGuard::thread(),
                    last_ns,
                    realtime: false,
                });
            }
        }
        let mut total = self.total_ns;
        self.threads.retain_mut(|w| {
            let Some(cpu) = cpu_ns(w.tid) else {
                // The thread is gone (the runtime is shutting down), or its schedstat cannot be
                // read (no file descriptor left?): never leave it real-time unwatched.
                if w.realtime {
                    let _ = set_policy(w.tid, false);
                    REGISTRY.threads.fetch_sub(1, Ordering::Relaxed);
                }
                if let Ok(mut tids) = REGISTRY.tids.lock() {
                    tids.retain(|t| *t != w.tid);
                }
                return false;
            };
            total += cpu.saturating_sub(w.last_ns);
            w.last_ns = cpu;
            w.guard.observe(
                now,
                Usage {
                    cpu_ns: cpu,
                    small: 0,
                },
            );
            true
        });
        self.total_ns = total;
        let all = Usage {
            cpu_ns: total,
            small: small_packets(),
        };
        match cpu_times(&self.cpus) {
            Some(times) => self.load.observe(now, times),
            // No /proc/stat: as if busy (the guards still apply).
            None => self.load.assume_busy(now),
        }
        if self.all.observe(now, all) == Some(Change::Demote) {
            tracing::info!(
                "packet threads are busy most of the time, or moving a flood of small packets: \
                 normal priority until they calm down"
            );
        }
        let busy = self.load.is_busy();
        for w in &mut self.threads {
            let want = busy && w.guard.is_realtime() && self.all.is_realtime();
            if want == w.realtime || set_policy(w.tid, want).is_err() {
                continue;
            }
            w.realtime = want;
            if want {
                REGISTRY.threads.fetch_add(1, Ordering::Relaxed);
            } else {
                REGISTRY.threads.fetch_sub(1, Ordering::Relaxed);
                if busy {
                    // Not the machine calming down: the guard found bulk work.
                    REGISTRY.demotions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard fed samples every 100 ms, with its clock and usage.
    struct Sim {
        g: BusyGuard,
        t: Instant,
        used: Usage,
    }

    impl Sim {
        fn new(g: BusyGuard) -> Self {
            let t = Instant::now();
            let mut g = g;
            g.observe(t, Usage::default());
            Sim {
                g,
                t,
                used: Usage::default(),
            }
        }

        /// `cores` of CPU and `small` small packets a second for `for_ms`: the changes decided.
        fn run(&mut self, cores: f64, small: u64, for_ms: u64) -> Vec<Change> {
            let mut changes = Vec::new();
            for _ in 0..for_ms / 100 {
                self.t += Duration::from_millis(100);
                self.used.cpu_ns += (cores * 100_000_000.0) as u64;
                self.used.small += small / 10;
                changes.extend(self.g.observe(self.t, self.used));
            }
            changes
        }
    }

    #[test]
    fn a_thread_that_mostly_waits_stays_realtime() {
        let mut s = Sim::new(BusyGuard::thread());
        assert!(s.run(0.5, 50_000, 10_000).is_empty());
        assert!(s.g.is_realtime());
    }

    #[test]
    fn a_thread_busy_for_a_window_is_demoted_and_comes_back_after_the_hold() {
        let mut s = Sim::new(BusyGuard::thread());
        assert_eq!(s.run(0.95, 1000, 1_000), vec![Change::Demote]);
        assert!(!s.g.is_realtime());
        // Calm at once, but the hold keeps it normal for HOLD.
        assert!(s.run(0.1, 1000, 2_900).is_empty());
        assert_eq!(s.run(0.1, 1000, 200), vec![Change::Promote]);
        assert!(s.g.is_realtime());
    }

    #[test]
    fn a_demoted_thread_that_stays_busy_stays_normal() {
        let mut s = Sim::new(BusyGuard::thread());
        assert_eq!(s.run(1.0, 1000, 1_000), vec![Change::Demote]);
        // Still above the line: stays normal, however long.
        assert!(s.run(0.85, 1000, 10_000).is_empty());
        assert!(!s.g.is_realtime());
    }

    #[test]
    fn work_that_keeps_coming_back_waits_longer_each_time() {
        let mut s = Sim::new(BusyGuard::thread());
        let mut holds = Vec::new();
        for _ in 0..6 {
            // Bulk at real-time, just under the limit at normal priority.
            assert_eq!(s.run(0.95, 0, 1_000), vec![Change::Demote]);
            holds.push(s.g.hold());
            let mut waited = 0;
            while s.run(0.75, 0, 100).is_empty() {
                waited += 100;
                assert!(waited < 60_000, "never promoted");
            }
        }
        let secs: Vec<u64> = holds.iter().map(|h| h.as_secs()).collect();
        assert_eq!(secs, vec![3, 6, 12, 24, 48, 48]);
        // A minute of calm real-time later, a demotion holds 3 s again.
        assert!(s.run(0.2, 0, 61_000).is_empty());
        assert_eq!(s.run(0.95, 0, 1_000), vec![Change::Demote]);
        assert_eq!(s.g.hold(), HOLD);
    }

    #[test]
    fn a_short_burst_is_not_busy() {
        let mut s = Sim::new(BusyGuard::thread());
        // 500 ms at 100% inside otherwise idle seconds: 50% over any one-second window.
        assert!(s.run(0.0, 0, 2_000).is_empty());
        assert!(s.run(1.0, 0, 500).is_empty());
        assert!(s.run(0.0, 0, 2_000).is_empty());
        assert!(s.g.is_realtime());
    }

    #[test]
    fn nothing_is_judged_before_a_full_window() {
        let mut s = Sim::new(BusyGuard::thread());
        assert!(s.run(1.0, 0, 900).is_empty());
        assert_eq!(s.run(1.0, 0, 100), vec![Change::Demote]);
    }

    #[test]
    fn all_workers_together_may_not_take_more_than_all_but_one_core() {
        assert_eq!(process_budget(1), 0.5);
        assert_eq!(process_budget(2), 1.0);
        assert_eq!(process_budget(8), 7.0);
        // Two workers at 60% each on two cores: each is fine alone, together they are not.
        let mut s = Sim::new(BusyGuard::process(2));
        assert_eq!(s.run(1.2, 2000, 1_000), vec![Change::Demote]);
        assert!(s.run(1.05, 2000, 5_000).is_empty());
        assert_eq!(s.run(0.5, 2000, 1_000), vec![Change::Promote]);
        // A download that keeps both workers at 45% (0.9 of a core) with its ACKs and a game
        // (5000 small packets a second) stays real-time.
        let mut s = Sim::new(BusyGuard::process(2));
        assert!(s.run(0.9, 5000, 10_000).is_empty());
    }

    #[test]
    fn a_flood_of_small_packets_goes_back_to_batching() {
        // 100 000 small packets a second, on a little CPU.
        let mut s = Sim::new(BusyGuard::process(2));
        assert_eq!(s.run(0.6, 100_000, 1_000), vec![Change::Demote]);
        // Still a flood, however it is scheduled now.
        assert!(s.run(0.8, 15_000, 10_000).is_empty());
        // Over, and a download goes on (0.9 of a core, its ACKs): real-time again, not only
        // for an idle daemon.
        assert_eq!(s.run(0.9, 4000, 1_000), vec![Change::Promote]);
        // A single thread is judged by CPU only (packets are the process's measure).
        let mut s = Sim::new(BusyGuard::thread());
        assert!(s.run(0.3, 500_000, 5_000).is_empty());
    }

    #[test]
    fn only_small_packets_count_for_the_flood_rule() {
        assert!(!is_small(1420));
        assert!(!is_small(SMALL_PACKET));
        assert!(is_small(84));
        // The counts are the process's (other tests move packets too): they only grow.
        let count = |way: Way| SMALL_PACKETS[way as usize].load(Ordering::Relaxed);
        for way in [Way::Sent, Way::Received] {
            let before = count(way);
            note_packet(way, 84);
            assert!(count(way) > before, "{way:?} counts");
        }
    }

    /// Feeds `load` samples every 100 ms with `cpus` CPUs `busy` (0..1) for `for_ms`.
    fn load_run(
        load: &mut MachineLoad,
        t: &mut Instant,
        times: &mut CpuTimes,
        busy: f64,
        for_ms: u64,
    ) {
        const CPUS: u64 = 2;
        for _ in 0..for_ms / 100 {
            *t += Duration::from_millis(100);
            // 100 ticks a second per CPU.
            times.total += 10 * CPUS;
            times.busy += (10.0 * CPUS as f64 * busy) as u64;
            load.observe(*t, *times);
        }
    }

    #[test]
    fn real_time_starts_soon_after_the_machine_gets_busy_and_ends_when_it_calms() {
        let (mut load, mut t, mut times) =
            (MachineLoad::default(), Instant::now(), CpuTimes::default());
        load.observe(t, times);
        load_run(&mut load, &mut t, &mut times, 0.2, 3_000);
        assert!(!load.is_busy(), "an idle machine");
        load_run(&mut load, &mut t, &mut times, 1.0, 400);
        assert!(load.is_busy(), "busy within 400 ms of a download");
        // Still mostly busy: no flapping.
        load_run(&mut load, &mut t, &mut times, 0.7, 3_000);
        assert!(load.is_busy());
        load_run(&mut load, &mut t, &mut times, 0.1, 1_100);
        assert!(!load.is_busy(), "calm again after a second");
    }

    #[test]
    fn proc_stat_is_read() {
        let all = cpu_times(&[]).expect("/proc/stat");
        assert!(all.total >= all.busy && all.total > 0);
        assert!(!allowed_cpus().is_empty());
        let first = allowed_cpus()[0];
        let one = cpu_times(&[first]).expect("one CPU's times");
        assert!(one.total <= all.total);
    }

    #[test]
    fn the_samples_kept_stay_bounded() {
        let mut s = Sim::new(BusyGuard::thread());
        s.run(0.3, 100, 60_000);
        assert!(s.g.samples.len() <= 12, "{}", s.g.samples.len());
    }

    #[test]
    fn the_calling_thread_enrolls_once_or_is_refused_cleanly() {
        // Whatever this process may do (root in CI, a user elsewhere), enrolling twice is one
        // attempt, and the thread ends as it should: real-time, or refused and normal.
        std::thread::spawn(|| {
            enroll_current_worker();
            enroll_current_worker();
            // SAFETY: plain query of the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
            // A thread it starts does not inherit real-time.
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) })
                .join()
                .expect("child thread");
            assert_eq!(child, libc::SCHED_OTHER);
            // Enrolled or refused, the thread is normal until the watchdog finds the machine
            // busy.
            assert_eq!(policy, libc::SCHED_OTHER);
            let s = stats();
            assert!(s.refused || s.enrolled >= 1, "{s:?}");
        })
        .join()
        .expect("enrolling thread");
    }

    /// Drops CAP_SYS_NICE from the calling thread's effective set (capabilities are per thread
    /// on Linux); false if that is not possible here.
    fn drop_cap_sys_nice() -> bool {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_NICE: u32 = 23;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data structs, as the kernel expects.
        unsafe {
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
                return false;
            }
            data[0].effective &= !(1 << CAP_SYS_NICE);
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
        }
    }

    #[test]
    fn a_thread_goes_back_to_normal_without_cap_sys_nice() {
        // The systemd unit allows real-time through RLIMIT_RTPRIO, without CAP_SYS_NICE; then
        // the kernel refuses to clear SCHED_RESET_ON_FORK, so going back to normal must keep it.
        std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            if set_policy(me, true).is_err() {
                return; // no real-time here at all: nothing to check
            }
            if !drop_cap_sys_nice() {
                let _ = set_policy(me, false);
                return;
            }
            let back = set_policy(me, false);
            // SAFETY: plain query of the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
            assert!(back.is_ok(), "{back:?}");
            assert_eq!(policy, libc::SCHED_OTHER);
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn cpu_time_is_read_from_schedstat() {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let before = cpu_ns(me).expect("schedstat of this thread");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_ns(me).expect("schedstat of this thread") > before);
    }
}
