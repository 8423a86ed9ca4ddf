//! What the benchmarks read off the operating system: the open-file limit (raised when allowed)
//! and a process's resident memory and CPU time, from `/proc`.

use super::BenchError;

/// Raises this process's open-file limit to at least `needed` (children inherit it). The soft
/// limit goes up to the hard one; past the hard one only a privileged user may go. When it cannot,
/// the error says exactly what to raise.
pub fn raise_fd_limit(needed: u64) -> Result<u64, BenchError> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    let hard = now.maximum.unwrap_or(u64::MAX);
    if soft >= needed {
        return Ok(soft);
    }
    let want = Rlimit {
        current: Some(needed),
        maximum: Some(hard.max(needed)),
    };
    match setrlimit(Resource::Nofile, want) {
        Ok(()) => Ok(needed),
        Err(e) => Err(BenchError::Stalled(format!(
            "need {needed} open files, the limit is {soft} (hard {hard}) and raising it failed ({e}): \
             run `ulimit -n {needed}` as a user allowed to (root, or raise `nofile` in \
             /etc/security/limits.conf), and check /proc/sys/fs/nr_open"
        ))),
    }
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time `pid` has used, user plus system, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture's ABI.
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(super::rss_kib(me).is_some_and(|k| k > 0));
        assert!(super::cpu_secs(me).is_some());
        assert!(super::rss_kib(u32::MAX).is_none());
    }
}
