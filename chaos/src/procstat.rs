//! CPU time of processes from `/proc` (Linux).
//!
//! `/proc/PID/stat` gives the user and system time (`utime`, `stime`) of a
//! whole process, every thread included, in clock ticks; the tick rate is
//! `sysconf(_SC_CLK_TCK)`, which the kernel hands every process in its
//! auxiliary vector (`AT_CLKTCK`, read here from `/proc/self/auxv`). A
//! [`CpuSampler`] reads the processes at the start of a run and again at the
//! end, and reports the difference in seconds.

use std::path::Path;

/// `AT_CLKTCK` in the auxiliary vector: the frequency of `times()`, which
/// is the unit of `utime` and `stime`.
const AT_CLKTCK: u64 = 17;
/// The clock tick of Linux on every common architecture, used when the
/// auxiliary vector cannot be read.
pub const DEFAULT_CLOCK_TICKS: u64 = 100;

/// User and system CPU time of a process, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// Time in user mode (`utime`, field 14 of `/proc/PID/stat`).
    pub user: u64,
    /// Time in kernel mode (`stime`, field 15).
    pub system: u64,
}

impl CpuTicks {
    /// User plus system ticks.
    pub fn total(self) -> u64 {
        self.user + self.system
    }
}

/// A `/proc` read that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read (most often: no such process).
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file did not have the expected layout.
    #[error("cannot parse {path}: {why}")]
    Parse {
        /// The file.
        path: String,
        /// What was wrong.
        why: String,
    },
}

/// Parses the contents of `/proc/PID/stat`.
///
/// The second field, the command name in parentheses, may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Result<CpuTicks, String> {
    let close = stat.rfind(')').ok_or("no ')' after the command name")?;
    // Fields 3.. follow the command name: state is field 3, utime 14, stime 15.
    let mut fields = stat[close + 1..].split_ascii_whitespace();
    let mut field = |n: usize, name: &str| -> Result<u64, String> {
        let s = fields.nth(n).ok_or_else(|| format!("no field {name}"))?;
        s.parse::<u64>()
            .map_err(|_| format!("field {name} is {s:?}, not a number"))
    };
    let user = field(14 - 3, "utime (14)")?;
    let system = field(0, "stime (15)")?;
    Ok(CpuTicks { user, system })
}

/// Reads the CPU time of process `pid` (every thread) from `/proc/PID/stat`.
pub fn read_ticks(pid: u32) -> Result<CpuTicks, ProcError> {
    read_ticks_from(&Path::new("/proc").join(pid.to_string()).join("stat"))
}

/// Reads the CPU time of this process.
pub fn read_own_ticks() -> Result<CpuTicks, ProcError> {
    read_ticks_from(Path::new("/proc/self/stat"))
}

fn read_ticks_from(path: &Path) -> Result<CpuTicks, ProcError> {
    let text = std::fs::read_to_string(path).map_err(|error| ProcError::Read {
        path: path.display().to_string(),
        error,
    })?;
    parse_stat(&text).map_err(|why| ProcError::Parse {
        path: path.display().to_string(),
        why,
    })
}

/// Finds `AT_CLKTCK` in an auxiliary vector (pairs of native-endian
/// machine words, as `/proc/self/auxv` holds them).
pub fn clock_ticks_from_auxv(auxv: &[u8]) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<u64> {
        let mut bytes = [0u8; WORD];
        bytes.copy_from_slice(b.get(..WORD)?);
        Some(usize::from_ne_bytes(bytes) as u64)
    };
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let key = word(&pair[..WORD])?;
        let value = word(&pair[WORD..])?;
        (key == AT_CLKTCK && value > 0).then_some(value)
    })
}

/// The clock ticks per second of `utime` and `stime`: `sysconf(_SC_CLK_TCK)`
/// from this process's auxiliary vector, or [`DEFAULT_CLOCK_TICKS`].
pub fn clock_ticks_per_second() -> u64 {
    std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| clock_ticks_from_auxv(&auxv))
        .unwrap_or(DEFAULT_CLOCK_TICKS)
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub fn load_average() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// Parses the first three fields of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut f = text.split_ascii_whitespace().map(|s| s.parse::<f64>().ok());
    Some([f.next()??, f.next()??, f.next()??])
}

/// CPU seconds one process used over a measured interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcessCpu {
    /// Process id.
    pub pid: u32,
    /// User plus system seconds; `None` when the process could not be read
    /// at the end (it exited).
    pub seconds: Option<f64>,
}

/// Measures the CPU time of a set of processes (and of this one) over an
/// interval: created at its start, [`CpuSampler::finish`] at its end.
#[derive(Debug)]
pub struct CpuSampler {
    ticks_per_second: u64,
    start: Vec<(u32, CpuTicks)>,
    own_start: Option<CpuTicks>,
}

/// What a [`CpuSampler`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUsage {
    /// Each measured process, in the order given.
    pub processes: Vec<ProcessCpu>,
    /// This process (the load generator), when readable.
    pub own_seconds: Option<f64>,
    /// The clock tick used to convert.
    pub ticks_per_second: u64,
}

impl CpuUsage {
    /// Total seconds of the measured processes; `None` when there are none
    /// or one of them could not be read at the end.
    pub fn total_seconds(&self) -> Option<f64> {
        if self.processes.is_empty() {
            return None;
        }
        self.processes.iter().map(|p| p.seconds).sum()
    }
}

impl CpuSampler {
    /// Reads the starting CPU time of every process in `pids`; fails when
    /// one cannot be read, so that a wrong pid is reported before the run.
    pub fn start(pids: &[u32]) -> Result<Self, ProcError> {
        let start = pids
            .iter()
            .map(|&pid| read_ticks(pid).map(|t| (pid, t)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ticks_per_second: clock_ticks_per_second(),
            start,
            own_start: read_own_ticks().ok(),
        })
    }

    /// Reads every process again and returns what each used since
    /// [`CpuSampler::start`].
    pub fn finish(&self) -> CpuUsage {
        let secs = |ticks: u64| ticks as f64 / self.ticks_per_second as f64;
        let processes = self
            .start
            .iter()
            .map(|&(pid, before)| ProcessCpu {
                pid,
                seconds: read_ticks(pid)
                    .ok()
                    .map(|after| secs(after.total().saturating_sub(before.total()))),
            })
            .collect();
        let own_seconds = match (self.own_start, read_own_ticks()) {
            (Some(before), Ok(after)) => Some(secs(after.total().saturating_sub(before.total()))),
            _ => None,
        };
        CpuUsage {
            processes,
            own_seconds,
            ticks_per_second: self.ticks_per_second,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from `cat /proc/self/stat`, with utime 7 and stime 3.
    const STAT: &str = "4242 (cat) R 4200 4242 4200 34816 4242 4194304 108 0 0 0 7 3 0 0 20 0 1 0 \
                        123456 5812224 201 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn parses_utime_and_stime() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t, CpuTicks { user: 7, system: 3 });
        assert_eq!(t.total(), 10);
    }

    #[test]
    fn command_names_with_spaces_and_parentheses() {
        let stat = STAT.replace("(cat)", "(tokio-rt (worker) 1)");
        assert_eq!(parse_stat(&stat).unwrap(), CpuTicks { user: 7, system: 3 });
        let stat = STAT.replace("(cat)", "())");
        assert_eq!(parse_stat(&stat).unwrap(), CpuTicks { user: 7, system: 3 });
    }

    #[test]
    fn malformed_stat() {
        assert!(parse_stat("").unwrap_err().contains("')'"));
        assert!(parse_stat("1 (x) R 1 2 3").unwrap_err().contains("utime"));
        let bad = STAT.replace(" 7 3 ", " 7 x ");
        assert!(parse_stat(&bad).unwrap_err().contains("stime (15) is \"x\""));
    }

    #[test]
    fn reads_this_process() {
        assert!(read_own_ticks().is_ok());
        assert!(read_ticks(std::process::id()).is_ok());
        let err = read_ticks(u32::MAX).unwrap_err().to_string();
        assert!(err.starts_with("cannot read /proc/4294967295/stat"), "{err}");
    }

    #[test]
    fn clock_tick_from_auxv() {
        let mut auxv = Vec::new();
        for (k, v) in [(6usize, 4096usize), (17, 250), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(clock_ticks_from_auxv(&auxv), Some(250));
        assert_eq!(clock_ticks_from_auxv(&auxv[..16]), None);
        assert_eq!(clock_ticks_from_auxv(&[]), None);
        // This machine's tick: 100 on every Linux build in use.
        assert!(clock_ticks_per_second() >= 1);
    }

    #[test]
    fn loadavg() {
        assert_eq!(parse_loadavg("0.52 1.03 2.50 3/456 7890\n"), Some([0.52, 1.03, 2.5]));
        assert_eq!(parse_loadavg("0.52 x"), None);
        assert!(load_average().is_some());
    }

    #[test]
    fn sampler_measures_cpu() {
        let me = std::process::id();
        let sampler = CpuSampler::start(&[me]).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let usage = sampler.finish();
        assert_eq!(usage.processes.len(), 1);
        assert!(usage.total_seconds().unwrap() >= 0.0);
        assert!(usage.own_seconds.is_some());
        assert!(CpuSampler::start(&[u32::MAX]).is_err());
        let none = CpuUsage {
            processes: vec![],
            own_seconds: None,
            ticks_per_second: 100,
        };
        assert_eq!(none.total_seconds(), None);
    }
}
