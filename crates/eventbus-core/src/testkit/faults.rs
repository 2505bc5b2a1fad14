//! What the fault suites of the backend crates share: the injected handler faults, quiet
//! injected panics, and the process's task count and memory.

/// A fault injected into one handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// A retryable error (5 % of the events).
    Error,
    /// A panic (0.1 % of the events).
    Panic,
}

/// The fault an event's first attempt gets, if any: a function of its `event_id` (64-bit
/// FNV-1a), so the same events fail in every run and in every process.
pub fn injected_fault(event_id: &str) -> Option<InjectedFault> {
    let h = event_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    if h % 1000 == 7 {
        Some(InjectedFault::Panic)
    } else if h % 20 == 3 {
        Some(InjectedFault::Error)
    } else {
        None
    }
}

/// The message of an injected panic starts with this.
pub const INJECTED_PANIC: &str = "injected panic";

/// Keeps panics whose message starts with [`INJECTED_PANIC`] out of stderr (they are
/// expected); every other panic is reported as before.
pub fn silence_injected_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with(INJECTED_PANIC));
        if !injected {
            default_hook(info);
        }
    }));
}

/// tokio tasks alive in the current runtime, and this process's resident memory in KiB
/// (`/proc/self/status`; 0 where it cannot be read).
pub fn tasks_and_rss() -> (usize, u64) {
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (tasks, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_five_percent_fail_and_a_thousandth_panic() {
        let ids: Vec<String> = (0..100_000).map(|i| format!("event-{i}")).collect();
        let count = |f| {
            ids.iter()
                .filter(|id| injected_fault(id) == Some(f))
                .count()
        };
        let (errors, panics) = (count(InjectedFault::Error), count(InjectedFault::Panic));
        assert!((4_000..6_000).contains(&errors), "{errors}");
        assert!((50..150).contains(&panics), "{panics}");
    }
}
