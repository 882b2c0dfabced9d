//! What the operating system says: file-descriptor limits, CPU time and
//! RSS of this process's threads and of a server process, from `/proc`.

use std::collections::HashMap;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft
/// limit now in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::Resource::NOFILE.get() {
        Ok((_, hard)) => rlimit::increase_nofile_limit(hard).unwrap_or(1024),
        Err(_) => 1024,
    }
}

/// CPU seconds (user + system) from a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Option<f64> {
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux ABI Herald supports.
    Some(ticks / 100.0)
}

/// CPU seconds of process `pid` (all its threads, live and exited).
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of this process, exited threads included.
pub fn self_cpu() -> f64 {
    process_cpu(std::process::id()).unwrap_or(0.0)
}

/// Total CPU seconds of the server processes `pids`: `None` when there are
/// none or one of them is gone.
pub fn servers_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| process_cpu(*p)).sum()
}

/// Total RSS (KiB) of the server processes `pids`: `None` when there are
/// none or one of them is gone.
pub fn servers_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| process_rss_kib(*p)).sum()
}

/// Resident set size of process `pid`, KiB.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU seconds of each live thread of this process, by thread id, with
/// the thread's name.
pub fn thread_cpu() -> HashMap<u32, (String, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return out };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let name = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')')).map_or("", |(n, _)| n).to_string();
        if let Some(cpu) = stat_cpu(&stat) {
            out.insert(tid, (name, cpu));
        }
    }
    out
}

/// CPU used between two [`thread_cpu`] snapshots, split into threads
/// whose name starts with `server_prefix` and the others: returns
/// `(client_total, busiest_client_thread, server_total, client_threads)`.
pub fn split_cpu(before: &HashMap<u32, (String, f64)>, after: &HashMap<u32, (String, f64)>, server_prefix: &str) -> (f64, f64, f64, usize) {
    let (mut client, mut busiest, mut server, mut threads) = (0.0, 0.0f64, 0.0, 0);
    for (tid, (name, cpu)) in after {
        let used = cpu - before.get(tid).map_or(0.0, |b| b.1);
        if name.starts_with(server_prefix) {
            server += used;
        } else {
            client += used;
            busiest = busiest.max(used);
            threads += 1;
        }
    }
    (client, busiest, server, threads)
}

/// Raises the fd limit and says what it allows.
pub fn fd_budget(connections: u64, progress: &crate::progress::Progress) {
    let limit = raise_fd_limit();
    if connections + 64 > limit {
        progress.note(&format!(
            "the file descriptor limit is {limit}: {connections} connections will not all open (raise the hard limit with ulimit -Hn)"
        ));
    }
}
